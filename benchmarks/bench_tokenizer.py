"""Encoding throughput of llamaforge's tokenizers against the libraries they wrap, used directly.

    python benchmarks/bench_tokenizer.py [--mb 4] [--gguf PATH]

Prints a table (MB/s of UTF-8 input, best of --repeat runs) and writes it as the "## Tokenizer throughput"
section of benchmarks/RESULTS.md, keeping the file's other sections.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Tokenizer throughput"


def make_text(megabytes: float) -> str:
    """A mixed corpus: English prose, code, numbers, whitespace runs, CJK and emoji."""
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "he",
        "this",
        "are",
        "or",
        "his",
        "from",
        "at",
        "which",
        "but",
        "have",
        "an",
        "they",
        "you",
        "were",
        "her",
        "she",
        "there",
        "been",
        "one",
        "all",
        "we",
        "their",
        "has",
        "would",
        "when",
        "if",
        "so",
        "no",
        "will",
        "more",
        "up",
        "out",
    ]
    chunks = [
        lambda: " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))).capitalize() + ". ",
        lambda: f"def f_{rng.randint(0, 999)}(x, y):\n    return x * {rng.randint(0, 99999)} + y  # note\n\n",
        lambda: f"{rng.randint(0, 10**9)} {rng.random():.6f} 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\t",
        lambda: "日本語のテキストと中文字符。" + "😀👍🏽 " * rng.randint(0, 2) + "\n",
        lambda: " " * rng.randint(2, 12) + "\n",
    ]
    weights = [60, 15, 10, 10, 5]
    parts, size = [], 0
    while size < megabytes * 1e6:
        part = rng.choices(chunks, weights)[0]()
        parts.append(part)
        size += len(part.encode())
    return "".join(parts)


def best_mb_per_s(fn: Callable[[str], object], text: str, repeat: int) -> float:
    fn(text[:1000])  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return len(text.encode()) / 1e6 / min(times)


def sentencepiece_model(directory: Path, text: str) -> Path:
    import sentencepiece as spm

    sample = directory / "corpus.txt"
    sample.write_text(text[:2_000_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=str(directory / "sp"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    return directory / "sp.model"


def rows(text: str, repeat: int, gguf: Path | None, workdir: Path) -> list[tuple[str, str, float, float]]:
    from llamaforge.tokenizer import load_tokenizer

    out = []
    try:
        import llama_models

        for generation in ("llama3", "llama4"):
            tok = load_tokenizer(Path(llama_models.__file__).parent / generation / "tokenizer.model")
            direct = best_mb_per_s(tok.enc.encode_ordinary, text, repeat)
            ours = best_mb_per_s(tok.encode, text, repeat)
            out.append((f"{generation} tokenizer.model", "tiktoken", direct, ours))
    except ModuleNotFoundError:
        print("llama-models not installed: skipping the tiktoken rows", file=sys.stderr)
    if gguf is not None:
        tok = load_tokenizer(gguf)
        saved = tok.save_pretrained(workdir / "hf")
        from tokenizers import Tokenizer as HFTok

        raw = HFTok.from_file(str(saved / "tokenizer.json"))
        hf = load_tokenizer(saved)
        direct = best_mb_per_s(lambda s: raw.encode(s, add_special_tokens=False).ids, text, repeat)
        ours = best_mb_per_s(hf.encode, text, repeat)
        out.append(("SmolLM2 tokenizer.json", "tokenizers", direct, ours))
        out.append(("SmolLM2 .gguf (gpt2 vocab)", "tokenizers", direct, best_mb_per_s(tok.encode, text, repeat)))
    import sentencepiece as spm

    model = sentencepiece_model(workdir, text)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(model)
    out.append(
        (
            f"SentencePiece BPE ({tok.vocab_size} pieces)",
            "sentencepiece",
            best_mb_per_s(sp.encode, text, repeat),
            best_mb_per_s(tok.encode, text, repeat),
        )
    )
    return out


def table(results: list[tuple[str, str, float, float]], megabytes: float) -> str:
    lines = [
        f"Encoding {megabytes:g} MB of mixed text (prose, code, numbers, whitespace, CJK, emoji), one thread, best "
        f"of 3; `python benchmarks/bench_tokenizer.py` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| tokenizer | library | library direct (MB/s) | llamaforge (MB/s) | llamaforge / direct |",
        "|---|---|---:|---:|---:|",
    ]
    for name, library, direct, ours in results:
        lines.append(f"| {name} | {library} | {direct:.2f} | {ours:.2f} | {ours / direct:.2f}x |")
    return "\n".join(lines) + "\n"


def write_section(body: str) -> None:
    from results import replace_section

    replace_section(f"{SECTION}\n\n{body}", path=RESULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text to encode")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gguf", type=Path, default=None, help="a GGUF with a gpt2 vocabulary (default: SmolLM2)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    gguf = args.gguf
    if gguf is None:
        try:
            from llamaforge.hub import builtin_model_path

            gguf = builtin_model_path("smollm2-135m-instruct")
        except Exception as exc:  # no cached model and no network
            print(f"SmolLM2 unavailable ({exc}): skipping the tokenizers rows", file=sys.stderr)
    text = make_text(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        results = rows(text, args.repeat, gguf, Path(tmp))
    body = table(results, args.mb)
    print(body)
    if not args.no_write:
        write_section(body)
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
