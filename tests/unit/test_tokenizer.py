"""Tests for systems.tokenizer: Baichuan-7B's recipe (split digits, byte fallback, exact round trip), the
training cache (reused, deterministic, safe under concurrent ranks) and clear errors for bad model paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from systems import tokenizer as tokenizer_module
from systems.corpus import generate_corpus
from systems.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1000
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def test_special_ids_and_no_bos_eos(tok: Tokenizer) -> None:
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= VOCAB
    ids = tok.encode("hello world")
    assert ids and ids[0] != tok.bos_id and ids[-1] != tok.eos_id


@pytest.mark.parametrize("text", ["1234567", "x = 1234567.", "共有1234567人", "3.14159"])
def test_digits_are_split(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for i in ids:
        assert sum(c.isdigit() for c in tok.decode([i])) <= 1, tok.id_to_piece(i)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("char", ["\u9f98", "\U0002a6a5"])
def test_unseen_cjk_goes_through_byte_fallback(tok: Tokenizer, char: str) -> None:
    text = f"他写了{char}字。"
    ids = tok.encode(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    byte_values = bytes(int(m.group(1), 16) for p in pieces if (m := BYTE_PIECE.fullmatch(p)))
    assert char.encode("utf-8") in byte_values
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "Kalovor (卡洛沃城) is a city of 123,456 people.\n卡洛沃城有123456人，建于1342年。",
    "  two leading spaces,  double  spaces,\ttab and trailing space ",
    "三十七加四十五等于八十二。37 + 45 = 82",
    "emoji 😀, accents café, Ext A \u3400\u4db5, full-width ＡＢＣ１２３",
    "\n\nnewlines first\r\nand CRLF\n",
])
def test_mixed_text_round_trips_exactly(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_save_then_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "copy.model")
    copy = load_tokenizer(tmp_path / "copy.model")
    assert copy.vocab_size == tok.vocab_size
    assert copy.encode("测试 test 42") == tok.encode("测试 test 42")


def test_cached_tokenizer_is_reused(corpus_files: list[Path], tok: Tokenizer,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tok.model_path.parents[2]
    mtime = tok.model_path.stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "_train_model", no_training)
    again = train_tokenizer(corpus_files, vocab_size=VOCAB, cache_dir=cache_dir)
    assert again.model_path == tok.model_path
    assert again.model_path.stat().st_mtime_ns == mtime


def test_training_is_deterministic(corpus_files: list[Path], tok: Tokenizer, tmp_path: Path) -> None:
    a = train_tokenizer(corpus_files, vocab_size=VOCAB, cache_dir=tmp_path / "a")
    b = train_tokenizer(corpus_files, vocab_size=VOCAB, cache_dir=tmp_path / "b")
    assert a.model_path != b.model_path
    assert a.model_path.read_bytes() == b.model_path.read_bytes() == tok.model_path.read_bytes()


def test_cache_key_depends_on_vocab_and_contents(corpus_files: list[Path], tok: Tokenizer,
                                                 tmp_path: Path) -> None:
    cache_dir = tok.model_path.parents[2]
    other_vocab = train_tokenizer(corpus_files, vocab_size=VOCAB + 100, cache_dir=cache_dir)
    assert other_vocab.model_path != tok.model_path
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus_files[0].read_text(encoding="utf-8") + "\nextra line\n", encoding="utf-8")
    other_data = train_tokenizer([edited, *corpus_files[1:]], vocab_size=VOCAB, cache_dir=cache_dir)
    assert other_data.model_path != tok.model_path


def test_vocab_size_is_a_soft_limit(corpus_files: list[Path], tmp_path: Path) -> None:
    small = generate_corpus(tmp_path / "small", n_files=1, total_mb=0.01, seed=3)
    tok = train_tokenizer(small, vocab_size=50_000, cache_dir=tmp_path / "cache")
    assert tok.vocab_size < 50_000


def test_too_small_vocab_is_a_clear_error(corpus_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.vocab_size=100 is too small .* at least \d+, so raise"):
        train_tokenizer(corpus_files, vocab_size=100, cache_dir=tmp_path)
    # The failed attempt leaves no (incomplete) cache entry behind.
    assert not any(p.name.startswith("bpe100-") for p in (tmp_path / "tokenizers").iterdir())


def test_concurrent_ranks_train_once(corpus_files: list[Path], tmp_path: Path) -> None:
    code = (
        "import logging, sys; from pathlib import Path; from systems.tokenizer import train_tokenizer\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "files = [Path(p) for p in sys.argv[2:]]\n"
        f"print(train_tokenizer(files, vocab_size={VOCAB}, cache_dir=Path(sys.argv[1])).model_path)\n"
    )
    args = [sys.executable, "-c", code, str(tmp_path), *map(str, corpus_files)]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert sum("trained a BPE tokenizer" in err for _, err in outs) == 1


def test_missing_tokenizer_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer_path .*nope\.model does not exist"):
        load_tokenizer(tmp_path / "nope.model")


def test_invalid_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"data\.tokenizer_path .*bad\.model is not a valid SentencePiece"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match=r"data\.tokenizer_path .* is not a file"):
        load_tokenizer(tmp_path)
