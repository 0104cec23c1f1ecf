"""SentencePiece BPE tokenizer following Baichuan-7B's recipe: load a user's model, or train and cache one.

Baichuan-7B's tokenizer is SentencePiece BPE with digits split into single pieces, byte fallback for
characters outside the vocabulary (so nothing ever maps to unk), no text normalisation and no dummy prefix,
so decode(encode(text)) == text. We train the same recipe on whatever corpus the run uses, at a vocabulary
small enough for CPU training; the trained model is cached under the cache dir keyed by the corpus
contents, the vocabulary size, the sentencepiece version and RECIPE_VERSION, so every rank and every later
run reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from systems.corpus import build_once

log = logging.getLogger("systems.tokenizer")

# Bump whenever the training options or the sentence sampling below change, so cached models are retrained.
RECIPE_VERSION = 1
# File name of the model inside a cache entry.
MODEL_FILE = "tokenizer.model"
# Training reads at most about this many bytes of text (every k-th line of the corpus), which bounds the
# training time on large user corpora; the 2 MB built-in corpus is read whole.
TRAIN_BUDGET_BYTES = 8_000_000
# Lines longer than this (in bytes) are skipped by SentencePiece training (they are still tokenized later).
MAX_SENTENCE_BYTES = 16_384
# Fixed rather than os.cpu_count(): the thread count is stored in the model file, and the model bytes must
# not depend on the machine.
TRAIN_THREADS = 2

# Baichuan-7B's recipe. Ids: unk=0, bos=1, eos=2, no pad.
_RECIPE = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    character_coverage=0.9995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    # vocab_size is a soft limit: a small corpus may support fewer pieces, and that is not an error.
    hard_vocab_limit=False,
    # We pass an already deterministic sample of lines (see _training_lines); SentencePiece must use it as is.
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=MAX_SENTENCE_BYTES,
    num_threads=TRAIN_THREADS,
    minloglevel=2,
)


class Tokenizer:
    """A SentencePiece model: encode/decode without BOS/EOS (the data loader appends EOS itself)."""

    def __init__(self, model_path: str | Path):
        self._path = Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self._path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file, to tell whether two tokenizers are the same."""
        return _sha256(self._path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def save(self, path: str | Path) -> None:
        """Copy the .model file to path."""
        shutil.copyfile(self._path, path)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a user's SentencePiece tokenizer.model (the file named by data.tokenizer_path)."""
    model = Path(path).expanduser()
    if not model.exists():
        raise FileNotFoundError(
            f"data.tokenizer_path {model} does not exist; point it at a SentencePiece tokenizer.model, "
            "or set it to null to train a tokenizer on the corpus.")
    if not model.is_file():
        raise ValueError(
            f"data.tokenizer_path {model} is not a file; point it at a SentencePiece tokenizer.model.")
    try:
        tokenizer = Tokenizer(model)
    except (RuntimeError, OSError) as err:
        raise ValueError(
            f"data.tokenizer_path {model} is not a valid SentencePiece model ({err}); point it at a "
            "tokenizer.model file, or set it to null to train one.") from err
    if tokenizer.eos_id < 0:
        raise ValueError(
            f"data.tokenizer_path {model} has no EOS token, which the data loader needs between documents; "
            "use a model trained with an eos_id.")
    return tokenizer


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_cache_key(files: list[Path], vocab_size: int) -> str:
    """Cache key: the files' contents (in order), vocab_size, sentencepiece version and RECIPE_VERSION."""
    payload = json.dumps({
        "files": [_sha256(Path(f)) for f in files],
        "vocab_size": vocab_size,
        "sentencepiece": spm.__version__,
        "recipe": RECIPE_VERSION,
    }, sort_keys=True)
    return f"bpe{vocab_size}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def _training_lines(files: list[Path]) -> Iterator[str]:
    """Every k-th non-blank line of the files, in order, with k chosen to stay within TRAIN_BUDGET_BYTES."""
    total = sum(Path(f).stat().st_size for f in files)
    stride = max(1, math.ceil(total / TRAIN_BUDGET_BYTES))
    index = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if index % stride == 0:
                    yield line
                index += 1


def _train_model(files: list[Path], vocab_size: int) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(files), model_writer=model, vocab_size=vocab_size, **_RECIPE)
    except RuntimeError as err:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if needed:
            raise ValueError(
                f"data.vocab_size={vocab_size} is too small for this corpus: its characters plus the 259 "
                f"byte/control pieces need at least {needed.group(1)}, so raise data.vocab_size or provide "
                "data.tokenizer_path.") from err
        raise ValueError(f"training a tokenizer with data.vocab_size={vocab_size} failed ({err}); check the "
                         "corpus in data.data_dir or provide data.tokenizer_path.") from err
    return model.getvalue()


def train_tokenizer(files: list[Path], *, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Train a tokenizer on files, or reuse the one cached in cache_dir/tokenizers/<key>/tokenizer.model."""
    if not files:
        raise ValueError("train_tokenizer needs at least one text file; check data.data_dir.")
    if vocab_size < 1:
        raise ValueError(f"data.vocab_size is {vocab_size} but must be a positive number of pieces.")
    files = [Path(f) for f in files]
    entry = Path(cache_dir).expanduser() / "tokenizers" / tokenizer_cache_key(files, vocab_size)

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        (tmp / MODEL_FILE).write_bytes(_train_model(files, vocab_size))
        seconds = time.perf_counter() - start
        actual = Tokenizer(tmp / MODEL_FILE).vocab_size
        meta = {"requested_vocab_size": vocab_size, "vocab_size": actual, "train_seconds": round(seconds, 2),
                "files": [str(f) for f in files], "sentencepiece": spm.__version__, "recipe": RECIPE_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        log.info("trained a BPE tokenizer on %d files in %.1f s: vocab_size %d (requested %d)",
                 len(files), seconds, actual, vocab_size)

    if not build_once(entry, build):
        log.info("using the cached tokenizer %s", entry / MODEL_FILE)
    return Tokenizer(entry / MODEL_FILE)
