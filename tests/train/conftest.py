"""Fixtures for the training tests: a deterministic synthetic corpus, a byte-level tokenizer (tests only)
and a prepared data directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaforge.train.data import Source, prepare_data

WORDS = [
    "the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "far", "away", "from", "home", "and", "then",
    "came", "back", "to", "eat", "some", "food", "in", "kitchen", "with", "big", "red", "ball", "under", "table",
    "near", "window", "when", "sun", "was", "bright",
]  # fmt: skip


class ByteTokenizer:
    """Bytes 0..255 plus BOS 256 and EOS 257: a tokenizer for tests that needs no training."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos


def write_corpus(folder: Path, n_files: int = 12, docs_per_file: int = 40, seed: int = 0) -> Path:
    """JSONL files of short, word-salad documents with some structure to learn (deterministic)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with (folder / f"part{f:02d}.jsonl").open("w") as fh:
            for _ in range(docs_per_file):
                sentences = []
                for _ in range(rng.randint(1, 4)):
                    start = rng.randrange(len(WORDS) - 8)
                    sentences.append(" ".join(WORDS[start : start + rng.randint(4, 8)]).capitalize() + ".")
                fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return folder


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two components (weights 3:1) of the synthetic corpus, tokenized bytewise, 10% validation."""
    root = tmp_path_factory.mktemp("train_data")
    a = write_corpus(root / "corpus_a", n_files=8, seed=1)
    b = write_corpus(root / "corpus_b", n_files=4, seed=2)
    out = root / "prepared"
    sources = [Source("web", [str(a)], weight=3.0), Source("books", [str(b)], weight=1.0)]
    prepare_data(sources, out, ByteTokenizer(), val_fraction=0.1, seed=0, workers=1, unit_bytes=4096, progress=False)
    return out
