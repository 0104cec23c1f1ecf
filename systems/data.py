"""Training data: find the text files, give each rank its own files, and pack documents into samples.

A data set is a folder of UTF-8 .txt files (or the built-in generated corpus). Each rank reads a disjoint
subset of the files (file i goes to rank i % world_size), splits them into documents (runs of non-blank
lines), tokenizes each document, appends EOS and cuts the resulting stream into samples of seq_len + 1
tokens that overlap by one token (Megatron's convention: every token is a prediction target). The loader's
position is a handful of integers, so a checkpoint can resume the stream exactly where it stopped.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from systems.corpus import ensure_builtin_corpus
from systems.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger("systems.data")

# Bytes read at a time when checking that a file is valid UTF-8.
_UTF8_CHUNK = 1 << 20
# Version of the loader's state dict layout.
_STATE_VERSION = 1
# Environment variable that overrides data.cache_dir.
CACHE_ENV = "CHUANLIU_CACHE"


@dataclass(kw_only=True)
class DataConfig:
    data_dir: str | None = None  # folder of UTF-8 .txt files; null = the built-in generated corpus
    tokenizer_path: str | None = None  # a SentencePiece tokenizer.model; null = train one on the corpus
    vocab_size: int = 4096  # vocabulary size when training a tokenizer (soft limit)
    cache_dir: str = "~/.cache/chuanliu"  # built-in corpus + trained tokenizers cache; $CHUANLIU_CACHE wins
    corpus_files: int = 8  # built-in corpus: number of files
    corpus_mb: float = 2.0  # built-in corpus: total size
    seed: int = 1234  # built-in corpus generator seed
    # How data-parallel ranks share the data: "files" (file i to rank i % dp: no rank reads another's text) or
    # "rows" (every rank packs the same global stream of dp x micro-batch rows and keeps its slice, as Megatron's
    # sampler does: a step's global batch then does not depend on dp, so a checkpoint resumes under another dp, at
    # the cost of every rank tokenizing all the text).
    shard: str = "files"

    def __post_init__(self) -> None:
        if self.shard not in ("files", "rows"):
            raise ValueError(f"data.shard={self.shard!r} is unknown; use files (each rank its own files) or rows "
                             "(one global stream, each rank its rows: resumable under another dp)")


def resolve_cache_dir(cache_dir: str | Path) -> Path:
    """The cache directory: $CHUANLIU_CACHE if set, else cache_dir with ~ expanded."""
    return Path(os.environ.get(CACHE_ENV) or cache_dir).expanduser()


# ---------------------------------------------------------------------------------------------------------
# Finding and checking files.
# ---------------------------------------------------------------------------------------------------------


def _scan(root: Path) -> tuple[list[Path], int]:
    """(.txt files under root sorted by relative path, number of other files); hidden ones are skipped."""
    texts, others = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            if name.endswith(".txt"):
                texts.append(path)
            else:
                others += 1
    return sorted(texts, key=lambda p: p.relative_to(root).parts), others


def _first_bad_utf8_byte(path: Path) -> int | None:
    """Offset of the first byte that is not valid UTF-8, or None; streams the file in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_UTF8_CHUNK)
            # Bytes of an incomplete character carried over from the previous chunk precede the new ones in
            # the decoder's view, so error offsets are relative to offset - len(pending).
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return offset - len(pending) + err.start
            if not chunk:
                return None
            offset += len(chunk)


def _check_utf8(path: Path) -> None:
    bad = _first_bad_utf8_byte(path)
    if bad is not None:
        raise ValueError(
            f"data.data_dir file {path} is not valid UTF-8 (first bad byte at offset {bad}); convert it to "
            f"UTF-8, e.g. with `iconv -f GB18030 -t UTF-8 {path.name} > {path.stem}.utf8.txt`, or remove it.")


def list_text_files(data_dir: str | Path) -> list[Path]:
    """All *.txt files under data_dir (recursive, hidden skipped), sorted by relative path, checked UTF-8."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data.data_dir {root} does not exist; set it to a folder of UTF-8 .txt files, or to null to "
            "use the built-in corpus.")
    if not root.is_dir():
        raise ValueError(
            f"data.data_dir {root} is a file, not a directory; set it to the folder that holds the text.")
    files, others = _scan(root)
    if not files:
        raise ValueError(
            f"data.data_dir {root} holds no .txt files ({others} other files); put the training text in "
            "UTF-8 files named *.txt.")
    for path in files:
        _check_utf8(path)
    if all(path.stat().st_size == 0 for path in files):
        raise ValueError(
            f"data.data_dir {root} has {len(files)} .txt files but all of them are empty; add text to them.")
    return files


def assign_files(files: list[Path], rank: int, world_size: int) -> list[Path]:
    """This rank's files: in sorted order, file i goes to rank i % world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world_size {world_size}.")
    if len(files) < world_size:
        raise ValueError(
            f"data.data_dir has {len(files)} text files but the job has {world_size} ranks; every rank needs "
            f"at least one file: split the data into at least {world_size} files or run fewer processes.")
    return sorted(Path(f) for f in files)[rank::world_size]


# ---------------------------------------------------------------------------------------------------------
# Documents.
# ---------------------------------------------------------------------------------------------------------


def _documents(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into documents: runs of non-blank lines, joined with their newlines (not the last one)."""
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).removesuffix("\n")
            doc = []
    if doc:
        yield "".join(doc).removesuffix("\n")


def split_documents(text: str) -> list[str]:
    """The documents of a text (as iter_documents would read them from a file holding it)."""
    return list(_documents(io.StringIO(text)))


def iter_documents(path: Path) -> Iterator[str]:
    """Stream the documents of a UTF-8 file (line endings normalised to \\n) without reading it whole."""
    with open(path, encoding="utf-8") as f:
        yield from _documents(f)


# ---------------------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------------------


def _files_fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names (relative to their common folder) and sizes."""
    root = os.path.commonpath([str(Path(f).parent) for f in files])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{os.path.relpath(f, root)}\0{Path(f).stat().st_size}\n".encode())
    return digest.hexdigest()


class PackedLoader:
    """Packs a rank's documents into (micro_batch_size, seq_len + 1) int64 batches, forever, in epochs.

    Position = (epoch, file_index, doc_index, doc_pos): the document being consumed is number doc_index - 1
    of file file_index, of whose tokens (encode(doc) + [eos]) doc_pos have been used; carry holds the tokens
    already taken for the next sample (just the one-token overlap between batches).
    """

    def __init__(self, files: list[Path], tokenizer: Tokenizer, *, seq_len: int, micro_batch_size: int):
        if not files:
            raise ValueError("PackedLoader needs at least one file; check data.data_dir.")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(
                f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must both be at least 1.")
        self._files = [Path(f) for f in files]
        self._tokenizer = tokenizer
        self._eos = tokenizer.eos_id
        self._seq_len = seq_len
        self._micro_batch_size = micro_batch_size
        self._fingerprint = _files_fingerprint(self._files)
        self._tokenizer_fingerprint = tokenizer.fingerprint
        self._epoch = 0
        self._file_index = 0
        self._doc_index = 0
        self._doc_tokens: list[int] = []
        self._doc_pos = 0
        self._carry: list[int] = []
        self._tokens_consumed = 0
        self._docs: Iterator[str] | None = None
        self._empty_files_in_a_row = 0

    @property
    def tokens_consumed(self) -> int:
        """Training tokens handed out so far: seq_len per sample (the overlap token is not counted twice)."""
        return self._tokens_consumed

    @property
    def epoch(self) -> int:
        """Completed passes over this rank's files."""
        return self._epoch

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def _next_document(self) -> None:
        """Load the next document's tokens, moving to the next file (and epoch) when a file runs out."""
        while True:
            if self._docs is None:
                self._docs = iter_documents(self._files[self._file_index])
                self._doc_index = 0
            doc = next(self._docs, None)
            if doc is not None:
                self._doc_index += 1
                self._empty_files_in_a_row = 0
                self._doc_tokens = self._tokenizer.encode(doc) + [self._eos]
                self._doc_pos = 0
                return
            self._advance_file(had_documents=self._doc_index > 0)

    def _advance_file(self, *, had_documents: bool) -> None:
        self._docs = None
        self._empty_files_in_a_row = 0 if had_documents else self._empty_files_in_a_row + 1
        if self._empty_files_in_a_row >= len(self._files):
            raise ValueError(
                f"the {len(self._files)} files given to this rank contain no text (only blank lines), e.g. "
                f"{self._files[0]}; put text in them or change data.data_dir.")
        self._file_index += 1
        if self._file_index == len(self._files):
            self._file_index = 0
            self._epoch += 1

    def _next_sample(self) -> list[int]:
        need = self._seq_len + 1
        sample = self._carry
        while len(sample) < need:
            if self._doc_pos >= len(self._doc_tokens):
                self._next_document()
                continue
            take = min(need - len(sample), len(self._doc_tokens) - self._doc_pos)
            sample.extend(self._doc_tokens[self._doc_pos : self._doc_pos + take])
            self._doc_pos += take
        # The last token of this sample is the first of the next one.
        self._carry = sample[-1:]
        self._tokens_consumed += self._seq_len
        return sample

    def next_batch(self) -> torch.Tensor:
        """The next (micro_batch_size, seq_len + 1) int64 batch."""
        rows = [self._next_sample() for _ in range(self._micro_batch_size)]
        return torch.tensor(rows, dtype=torch.int64)

    def state_dict(self) -> dict:
        """The loader's position: JSON-serialisable, a few ints, two fingerprints and the carried token."""
        return {
            "version": _STATE_VERSION,
            "files_fingerprint": self._fingerprint,
            "n_files": len(self._files),
            "tokenizer_fingerprint": self._tokenizer_fingerprint,
            "epoch": self._epoch,
            "file_index": self._file_index,
            "doc_index": self._doc_index if self._docs is not None else 0,
            "doc_pos": self._doc_pos,
            "carry": list(self._carry),
            "tokens_consumed": self._tokens_consumed,
        }

    def _check_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"data loader state has version {state.get('version')}, expected {_STATE_VERSION}; it was "
                "saved by a different chuanliu version, so start a fresh run.")
        if state["files_fingerprint"] != self._fingerprint or state["n_files"] != len(self._files):
            raise ValueError(
                f"data loader state was saved for other files than this rank's {len(self._files)} files; "
                "resume with the same data.data_dir and number of ranks, or start a fresh run.")
        if state["tokenizer_fingerprint"] != self._tokenizer_fingerprint:
            raise ValueError("data loader state was saved with a different tokenizer; resume with the same "
                             "data.tokenizer_path / data.vocab_size, or start a fresh run.")
        if len(state["carry"]) > self._seq_len:
            raise ValueError(f"data loader state carries {len(state['carry'])} tokens, more than seq_len "
                             f"{self._seq_len}; resume with the same seq_len.")

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of a loader over the same files and tokenizer."""
        self._check_state(state)
        self._epoch = int(state["epoch"])
        self._file_index = int(state["file_index"])
        self._carry = [int(t) for t in state["carry"]]
        self._tokens_consumed = int(state["tokens_consumed"])
        self._empty_files_in_a_row = 0
        self._docs, self._doc_tokens, self._doc_index = None, [], 0
        doc_index = int(state["doc_index"])
        if doc_index:
            self._restore_document(doc_index)
        self._doc_pos = int(state["doc_pos"]) if doc_index else 0

    def _restore_document(self, doc_index: int) -> None:
        """Reopen the current file and re-tokenize document doc_index - 1, skipping the ones before it."""
        path = self._files[self._file_index]
        self._docs = iter_documents(path)
        for _ in range(doc_index - 1):
            if next(self._docs, None) is None:
                break
        doc = next(self._docs, None)
        if doc is None:
            raise ValueError(f"data loader state points at document {doc_index} of {path}, which has fewer "
                             "documents now; the file changed since the checkpoint, so start a fresh run.")
        self._doc_index = doc_index
        self._doc_tokens = self._tokenizer.encode(doc) + [self._eos]


# ---------------------------------------------------------------------------------------------------------
# Putting it together.
# ---------------------------------------------------------------------------------------------------------


def check_enough_text(files: list[Path], tokenizer: Tokenizer, *, seq_len: int, rank: int, world_size: int) -> None:
    """Refuse a rank's share of the data that holds less than one training sample (seq_len + 1 tokens): the
    loader would loop over the same few tokens for every row of every batch. Tokens are counted only when the
    bytes could be too few (a BPE piece covers at least one byte), so a real corpus costs nothing here."""
    need = seq_len + 1
    nbytes = sum(f.stat().st_size for f in files)
    if nbytes >= 4 * need:
        return
    tokens = sum(len(tokenizer.encode(doc)) + 1 for f in files for doc in iter_documents(f))
    if tokens < need:
        share = f"rank {rank}'s share ({len(files)} of the files)" if world_size > 1 else "the data"
        raise ValueError(f"{share} holds {nbytes} bytes = {tokens} tokens, less than one training sample of "
                         f"train.seq_len + 1 = {need} tokens; training would repeat the same tokens in every row. "
                         f"Give at least {need} tokens (about {need * 4} bytes) of text per rank in data.data_dir, "
                         "or lower train.seq_len" + (", or use fewer ranks" if world_size > 1 else ""))


def build_data(cfg: DataConfig, *, seq_len: int, micro_batch_size: int, rank: int,
               world_size: int) -> tuple[Tokenizer, PackedLoader]:
    """Resolve and check the data files, give this rank its share, and get the (shared) tokenizer."""
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    if cfg.data_dir is None:
        data_dir = ensure_builtin_corpus(cache_dir, n_files=cfg.corpus_files, total_mb=cfg.corpus_mb,
                                         seed=cfg.seed)
    else:
        data_dir = Path(cfg.data_dir).expanduser()
    files = list_text_files(data_dir)
    mine = assign_files(files, rank, world_size) if cfg.shard == "files" else files
    # Every rank trains (or loads from the cache) on ALL files, so all ranks share one vocabulary.
    if cfg.tokenizer_path:
        tokenizer = load_tokenizer(cfg.tokenizer_path)
    else:
        tokenizer = train_tokenizer(files, vocab_size=cfg.vocab_size, cache_dir=cache_dir)
    if not cfg.tokenizer_path and tokenizer.vocab_size < cfg.vocab_size:
        log.warning("data.vocab_size=%d was requested but %s (%d bytes) supports only %d pieces: the tokenizer has "
                    "%d, and %d rows of the model's embedding will never be used; give more text or lower "
                    "data.vocab_size (and model.vocab_size) to %d", cfg.vocab_size, data_dir,
                    sum(f.stat().st_size for f in files), tokenizer.vocab_size, tokenizer.vocab_size,
                    cfg.vocab_size - tokenizer.vocab_size, tokenizer.vocab_size)
    check_enough_text(mine, tokenizer, seq_len=seq_len, rank=rank, world_size=world_size)
    if cfg.shard == "rows":
        whole = PackedLoader(mine, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size * world_size)
        loader = RowShard(whole, rank=rank, rows=micro_batch_size)
    else:
        loader = PackedLoader(mine, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size)
    log.info("rank %d/%d: %d of %d files (%d bytes, data.shard=%s) from %s; tokenizer %s, vocab_size %d", rank,
             world_size, len(mine), len(files), sum(f.stat().st_size for f in mine), cfg.shard, data_dir,
             tokenizer.model_path, tokenizer.vocab_size)
    return tokenizer, loader


class RowShard:
    """data.shard=rows: a loader over the whole corpus packing global batches of dp x micro-batch rows, of which
    this rank keeps rows [rank x rows, (rank + 1) x rows). Its state is the global stream's position, the same on
    every rank, which is what lets a checkpoint written with one dp be read with another (same global batch)."""

    def __init__(self, inner: PackedLoader, *, rank: int, rows: int):
        self.inner, self.rank, self.rows = inner, rank, rows

    def next_batch(self) -> torch.Tensor:
        return self.inner.next_batch()[self.rank * self.rows:(self.rank + 1) * self.rows]

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "shard": "rows"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shard") != "rows":
            raise ValueError("the checkpoint's data position is one rank's own files (data.shard=files); resume "
                             "with data.shard=files")
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "shard"})

    def __getattr__(self, name: str):  # tokens_consumed, epoch, files ...: the global stream's
        return getattr(self.inner, name)
