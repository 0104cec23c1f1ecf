"""Fixtures shared by unit tests: a small generated corpus and a tokenizer trained on it (built once)."""
from __future__ import annotations

from pathlib import Path

import pytest

from systems.corpus import generate_corpus
from systems.tokenizer import Tokenizer, train_tokenizer

VOCAB = 1000  # small enough to train in well under a second on the 0.3 MB corpus


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), n_files=4, total_mb=0.3, seed=7)


@pytest.fixture(scope="session")
def tok(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(corpus_files, vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("cache"))
