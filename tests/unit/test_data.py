"""Tests for systems.data and systems.corpus: file discovery and its errors, rank assignment, document
packing (EOS, one-token overlap, exact stream), resumable loader state, epochs, the built-in corpus and
build_data end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from systems import data as data_module
from systems.corpus import COMPLETE_MARKER, RARE_CHAR_RANGE, ensure_builtin_corpus, generate_corpus
from systems.data import (
    DataConfig,
    PackedLoader,
    assign_files,
    build_data,
    list_text_files,
    resolve_cache_dir,
    split_documents,
)
from systems.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1000


@pytest.fixture()
def tiny_files(tmp_path: Path) -> list[Path]:
    """Three small files of a few documents (with blank-line noise; the last without a final newline)."""
    texts = ["第一篇文章。\nline two of doc one\n\nDoc two: 42 + 8 = 50\n",
             "\n\n  \nAlpha 甲\n\n\n\nBeta 乙\nGamma 丙\n   \n",
             "最后一个文件 the last file, 2024年"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"t{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def expected_stream(files: list[Path], tok: Tokenizer) -> list[int]:
    """encode(doc) + [eos] over the documents of the files, in order (documents split independently here)."""
    stream = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for doc in split_documents(text):
            stream += tok.encode(doc) + [tok.eos_id]
    return stream


def unpack(batches: list[torch.Tensor]) -> list[int]:
    """Undo the packing: the first sample whole, then each later one without its overlapping first token."""
    samples = [row.tolist() for b in batches for row in b]
    return samples[0] + [t for s in samples[1:] for t in s[1:]]


# ---------------------------------------------------------------------------------------------------------
# Config and cache dir.
# ---------------------------------------------------------------------------------------------------------


def test_data_config_fields() -> None:
    names = [f.name for f in dataclasses.fields(DataConfig)]
    assert names == ["data_dir", "tokenizer_path", "vocab_size", "cache_dir", "corpus_files", "corpus_mb",
                     "seed", "shard"]
    cfg = DataConfig()
    assert (cfg.data_dir, cfg.tokenizer_path, cfg.vocab_size, cfg.corpus_files) == (None, None, 4096, 8)
    with pytest.raises(TypeError):
        DataConfig(None)  # kw_only


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHUANLIU_CACHE", raising=False)
    assert resolve_cache_dir("~/.cache/chuanliu") == Path.home() / ".cache" / "chuanliu"
    monkeypatch.setenv("CHUANLIU_CACHE", str(tmp_path))
    assert resolve_cache_dir("~/.cache/chuanliu") == tmp_path


# ---------------------------------------------------------------------------------------------------------
# Files and ranks.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_every_file_goes_to_exactly_one_rank(tmp_path: Path, world_size: int) -> None:
    files = [tmp_path / f"f{i}.txt" for i in range(7)]
    parts = [assign_files(files, rank, world_size) for rank in range(world_size)]
    assert sorted(itertools.chain(*parts)) == files
    for a, b in itertools.combinations(parts, 2):
        assert not set(a) & set(b)
    assert all(parts[r] == files[r::world_size] for r in range(world_size))
    # Deterministic, whatever order the caller lists the files in.
    assert [assign_files(files[::-1], rank, world_size) for rank in range(world_size)] == parts


def test_fewer_files_than_ranks_is_a_clear_error(tmp_path: Path) -> None:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(ValueError, match="data.data_dir has 2 text files but the job has 3 ranks; every rank "
                                         "needs at least one file: split the data into at least 3 files"):
        assign_files(files, 0, 3)


def test_listing_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b.txt", "a/z.txt", "a/b/c.txt", "a-b/x.txt", ".hidden/h.txt", "a/.h.txt", "notes.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("text\n", encoding="utf-8")
    files = list_text_files(tmp_path)
    relative = [f.relative_to(tmp_path).as_posix() for f in files]
    assert relative == ["a/b/c.txt", "a/z.txt", "a-b/x.txt", "b.txt"]
    assert files == sorted(files)  # the same order assign_files uses


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir .*nowhere does not exist"):
        list_text_files(tmp_path / "nowhere")


def test_file_instead_of_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.data_dir .*one\.txt is a file, not a directory"):
        list_text_files(tmp_path / "one.txt")


def test_dir_without_txt_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.data_dir .* holds no \.txt files \(0 other files\)"):
        list_text_files(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "readme.md").write_text("hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds no \.txt files \(2 other files\)"):
        list_text_files(tmp_path)


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("你好\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"ok\xff\xfe")
    message = r"data\.data_dir file .*bad\.txt is not valid UTF-8 \(first bad byte at offset 2\); convert it"
    with pytest.raises(ValueError, match=message + r" to UTF-8, e\.g\. with `iconv"):
        list_text_files(tmp_path)


def test_utf8_check_streams_across_chunk_boundaries(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "_UTF8_CHUNK", 4)
    good = "ab汉字中文😀xyz".encode()  # multi-byte characters straddle the 4-byte chunks
    (tmp_path / "a.txt").write_bytes(good)
    assert len(list_text_files(tmp_path)) == 1
    (tmp_path / "a.txt").write_bytes(good + b"\xe4\xb8" + b"q")  # truncated character, then ASCII
    with pytest.raises(ValueError, match=f"offset {len(good)}\\)"):
        list_text_files(tmp_path)
    (tmp_path / "a.txt").write_bytes(good + b"\xe4\xb8")  # truncated character at the end of the file
    with pytest.raises(ValueError, match=f"offset {len(good)}\\)"):
        list_text_files(tmp_path)


def test_all_empty_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.data_dir .* has 2 \.txt files but all of them are empty"):
        list_text_files(tmp_path)
    (tmp_path / "b.txt").write_text("some text\n", encoding="utf-8")
    assert len(list_text_files(tmp_path)) == 2  # some empty files are fine


# ---------------------------------------------------------------------------------------------------------
# Documents and packing.
# ---------------------------------------------------------------------------------------------------------


def test_split_documents() -> None:
    text = "\n\nfirst doc\nsecond line\n\n \t \nnext doc\n\n\n\nlast doc, no newline"
    assert split_documents(text) == ["first doc\nsecond line", "next doc", "last doc, no newline"]
    assert split_documents("") == [] and split_documents("\n \n") == []


def test_packing_stream_eos_and_overlap(corpus_files: list[Path], tok: Tokenizer) -> None:
    seq_len, mbs = 64, 4
    loader = PackedLoader(corpus_files[:2], tok, seq_len=seq_len, micro_batch_size=mbs)
    batches = [loader.next_batch() for _ in range(40)]
    for b in batches:
        assert b.dtype == torch.int64 and b.shape == (mbs, seq_len + 1)
    samples = [row.tolist() for b in batches for row in b]
    for prev, nxt in itertools.pairwise(samples):
        assert prev[-1] == nxt[0]  # consecutive samples overlap by one token, across batches too
    stream = unpack(batches)
    expected = expected_stream(corpus_files[:2], tok)
    assert len(expected) > len(stream)  # still in the first epoch
    assert stream == expected[: len(stream)]
    assert loader.tokens_consumed == len(samples) * seq_len == len(stream) - 1
    assert loader.epoch == 0


def test_documents_end_in_eos(tiny_files: list[Path], tok: Tokenizer) -> None:
    loader = PackedLoader(tiny_files, tok, seq_len=8, micro_batch_size=1)
    docs = [d for f in tiny_files for d in split_documents(f.read_text(encoding="utf-8"))]
    assert docs == ["第一篇文章。\nline two of doc one", "Doc two: 42 + 8 = 50", "Alpha 甲",
                    "Beta 乙\nGamma 丙", "最后一个文件 the last file, 2024年"]
    expected = expected_stream(tiny_files, tok)
    stream = unpack([loader.next_batch() for _ in range(len(expected) // 8)])
    assert stream == expected[: len(stream)]
    # EOS appears exactly at the end of each document.
    ends, pos = [], 0
    for doc in docs:
        pos += len(tok.encode(doc)) + 1
        ends.append(pos - 1)
    assert [i for i, t in enumerate(expected) if t == tok.eos_id] == ends


def test_epochs_wrap_around(tiny_files: list[Path], tok: Tokenizer) -> None:
    expected = expected_stream(tiny_files, tok)
    seq_len = 5
    loader = PackedLoader(tiny_files, tok, seq_len=seq_len, micro_batch_size=3)
    epochs, batches = [], []
    while loader.tokens_consumed < 3 * len(expected) + 10:
        batches.append(loader.next_batch())
        epochs.append(loader.epoch)
    stream = unpack(batches)
    assert stream == (expected * 4)[: len(stream)]
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] == 3


def test_state_dict_round_trip(tiny_files: list[Path], tok: Tokenizer) -> None:
    # Saving after every k hits file, document and epoch boundaries at many different points.
    for k in range(0, 25):
        a = PackedLoader(tiny_files, tok, seq_len=7, micro_batch_size=2)
        for _ in range(k):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))
        assert len(state["carry"]) <= 7 and len(json.dumps(state)) < 600
        b = PackedLoader(tiny_files, tok, seq_len=7, micro_batch_size=2)
        b.load_state_dict(state)
        assert (b.tokens_consumed, b.epoch) == (a.tokens_consumed, a.epoch)
        for _ in range(6):
            assert torch.equal(a.next_batch(), b.next_batch())


def test_state_dict_round_trip_on_corpus(corpus_files: list[Path], tok: Tokenizer) -> None:
    a = PackedLoader(corpus_files, tok, seq_len=128, micro_batch_size=4)
    for _ in range(5):
        a.next_batch()
    b = PackedLoader(corpus_files, tok, seq_len=128, micro_batch_size=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):
        assert torch.equal(a.next_batch(), b.next_batch())


def test_state_from_other_files_is_rejected(tiny_files: list[Path], tok: Tokenizer) -> None:
    a = PackedLoader(tiny_files, tok, seq_len=7, micro_batch_size=2)
    a.next_batch()
    b = PackedLoader(tiny_files[:2], tok, seq_len=7, micro_batch_size=2)
    with pytest.raises(ValueError, match="saved for other files than this rank's 2 files"):
        b.load_state_dict(a.state_dict())


def test_files_with_only_blank_lines_are_a_clear_error(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "blank.txt").write_text("\n \n\t\n", encoding="utf-8")
    loader = PackedLoader([tmp_path / "blank.txt"], tok, seq_len=4, micro_batch_size=1)
    with pytest.raises(ValueError, match="contain no text"):
        loader.next_batch()


# ---------------------------------------------------------------------------------------------------------
# The built-in corpus.
# ---------------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", n_files=3, total_mb=0.1, seed=5)
    b = generate_corpus(tmp_path / "b", n_files=3, total_mb=0.1, seed=5)
    c = generate_corpus(tmp_path / "c", n_files=3, total_mb=0.1, seed=6)
    assert [p.name for p in a] == ["corpus_00.txt", "corpus_01.txt", "corpus_02.txt"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    assert 0.09e6 < sum(p.stat().st_size for p in a) < 0.12e6
    # Pinned: the bytes cached corpora and tokenizers were built from (GENERATOR_VERSION 1). A change to the
    # templates or to corpus_words.json must bump GENERATOR_VERSION and this digest together.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in a)).hexdigest()
    assert digest == "a5c094cc1cfaa22ae326d214a1221515d04d5658a435a65f225232645ec41146"


def test_corpus_mixes_scripts_digits_and_rare_characters(corpus_files: list[Path]) -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in corpus_files)
    n = len(text)
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
    letters = sum(c.isascii() and c.isalpha() for c in text)
    digits = sum(c.isascii() and c.isdigit() for c in text)
    rare = [c for c in text if RARE_CHAR_RANGE[0] <= ord(c) <= RARE_CHAR_RANGE[1]]
    assert cjk / n > 0.1 and letters / n > 0.2 and digits / n > 0.05
    assert 0 < len(rare) < 0.001 * n
    assert "\u9f98" not in text and max(map(ord, text)) < 0x10000  # the tests' "unseen" characters


def test_corpus_documents_are_paragraphs(corpus_files: list[Path]) -> None:
    text = corpus_files[0].read_text(encoding="utf-8")
    assert "\n\n\n" not in text and text.endswith("\n") and not text.startswith("\n")
    docs = text.removesuffix("\n").split("\n\n")
    assert split_documents(text) == docs and len(docs) > 50
    assert all(line.strip() for doc in docs for line in doc.split("\n"))


def test_builtin_corpus_is_cached(tmp_path: Path) -> None:
    d = ensure_builtin_corpus(tmp_path, n_files=2, total_mb=0.02, seed=3)
    assert (d / COMPLETE_MARKER).is_file() and d.parent == tmp_path
    files = list_text_files(d)
    assert [f.name for f in files] == ["corpus_00.txt", "corpus_01.txt"]  # the marker is not listed
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert ensure_builtin_corpus(tmp_path, n_files=2, total_mb=0.02, seed=3) == d
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert ensure_builtin_corpus(tmp_path, n_files=2, total_mb=0.02, seed=4) != d


def test_builtin_corpus_concurrent_callers(tmp_path: Path) -> None:
    code = (
        "import logging, sys; from pathlib import Path; from systems.corpus import ensure_builtin_corpus\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "print(ensure_builtin_corpus(Path(sys.argv[1]), n_files=3, total_mb=0.2, seed=9))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert sum("generated the built-in corpus" in err for _, err in outs) == 1
    d = Path(outs[0][0].strip())
    fresh = generate_corpus(tmp_path / "fresh", n_files=3, total_mb=0.2, seed=9)
    assert [(d / p.name).read_bytes() for p in fresh] == [p.read_bytes() for p in fresh]
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temp dirs left behind


def test_corpus_cli(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "cli"), "--files", "2", "--mb", "0.01", "--seed", "1"]
    out = subprocess.run([sys.executable, "-m", "systems.corpus", *args], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert "wrote 2 files" in out.stdout
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["corpus_00.txt", "corpus_01.txt"]


# ---------------------------------------------------------------------------------------------------------
# build_data.
# ---------------------------------------------------------------------------------------------------------


def test_build_data_builtin_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUANLIU_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(vocab_size=VOCAB, corpus_files=4, corpus_mb=0.2, seed=2)
    built = [build_data(cfg, seq_len=32, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    (tok0, loader0), (tok1, loader1) = built
    assert tok0.model_path == tok1.model_path  # one tokenizer, trained on all files
    assert tok0.model_path.is_relative_to(tmp_path / "cache")
    assert [f.name for f in loader0.files] == ["corpus_00.txt", "corpus_02.txt"]
    assert [f.name for f in loader1.files] == ["corpus_01.txt", "corpus_03.txt"]
    assert loader0.next_batch().shape == (2, 33)


def test_build_data_user_dir_and_tokenizer(tmp_path: Path, tiny_files: list[Path], tok: Tokenizer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUANLIU_CACHE", str(tmp_path / "cache"))
    tok.save(tmp_path / "my.model")
    cfg = DataConfig(data_dir=str(tiny_files[0].parent), tokenizer_path=str(tmp_path / "my.model"))
    got_tok, loader = build_data(cfg, seq_len=8, micro_batch_size=1, rank=2, world_size=3)
    assert got_tok.encode("测试") == tok.encode("测试")
    assert loader.files == [tiny_files[2]]
    assert not (tmp_path / "cache").exists()  # nothing generated or trained
    with pytest.raises(ValueError, match="has 3 text files but the job has 4 ranks"):
        build_data(cfg, seq_len=8, micro_batch_size=1, rank=0, world_size=4)


def test_row_sharded_ranks_split_the_one_process_batches_and_resume_under_another_dp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.shard=rows: dp ranks' rows, stacked, are the batches one process reads with dp x the micro-batch; the
    position is the global stream's, so dp=4's saved state continues under dp=2 (and one process) alike."""
    monkeypatch.setenv("CHUANLIU_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(vocab_size=VOCAB, corpus_files=4, corpus_mb=0.2, seed=2, shard="rows")
    one = build_data(cfg, seq_len=16, micro_batch_size=4, rank=0, world_size=1)[1]
    dp2 = [build_data(cfg, seq_len=16, micro_batch_size=2, rank=r, world_size=2)[1] for r in range(2)]
    dp4 = [build_data(cfg, seq_len=16, micro_batch_size=1, rank=r, world_size=4)[1] for r in range(4)]
    for _ in range(3):
        whole = one.next_batch()
        assert torch.equal(torch.cat([ld.next_batch() for ld in dp2]), whole)
        assert torch.equal(torch.cat([ld.next_batch() for ld in dp4]), whole)
    state = dp4[3].state_dict()
    assert all(ld.state_dict() == state for ld in dp4)  # one position, whichever rank saved it
    for ld in dp2:
        ld.load_state_dict(state)
    assert torch.equal(torch.cat([ld.next_batch() for ld in dp2]), one.next_batch())
    with pytest.raises(ValueError, match="data.shard=files"):  # a file-sharded position cannot be taken
        dp2[0].load_state_dict(build_data(DataConfig(vocab_size=VOCAB, corpus_files=4, corpus_mb=0.2, seed=2),
                                          seq_len=16, micro_batch_size=2, rank=0, world_size=2)[1].state_dict())
    with pytest.raises(ValueError, match="data.shard='bogus' is unknown"):
        DataConfig(shard="bogus")
