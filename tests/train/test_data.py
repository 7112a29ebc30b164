"""prepare-data shards and the packed loader: layout, resumability, parallel equality, mix, exact position."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ByteTokenizer, write_corpus

from llamaforge.errors import UserError
from llamaforge.train.data import (
    PackedLoader,
    Source,
    ValidationSet,
    document_mask,
    load_mix,
    prepare_data,
    read_meta,
)


def _all_tokens(out: Path) -> dict[str, np.ndarray]:
    meta = read_meta(out)
    return {f"{n}/{s}": np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in c[s]] or [np.zeros(0)])
            for n, c in meta["components"].items() for s in ("train", "val")}  # fmt: skip


def test_prepared_layout(prepared: Path) -> None:
    meta = read_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["bos_id"] == 256 and meta["eos_id"] == 257
    assert set(meta["components"]) == {"web", "books"}
    assert meta["components"]["web"]["weight"] == 3.0
    tokens = _all_tokens(prepared)
    for name, arr in tokens.items():
        assert arr.size == meta["components"][name.split("/")[0]][f"{name.split('/')[1]}_tokens"]
        # documents are packed back to back as BOS ... EOS
        assert arr[0] == 256 and arr[-1] == 257
        assert (arr == 256).sum() == (arr == 257).sum()
        starts = np.flatnonzero(arr == 256)
        assert (arr[starts[1:] - 1] == 257).all()
    docs = sum(c["documents"] for c in meta["components"].values())
    assert docs == 12 * 40
    val_share = sum(c["val_tokens"] for c in meta["components"].values()) / sum(
        c["train_tokens"] + c["val_tokens"] for c in meta["components"].values()
    )
    assert 0.04 < val_share < 0.2


def test_parallel_equals_serial_and_resume(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", n_files=6, docs_per_file=20)
    sources = [Source("c", [str(corpus)])]
    serial = tmp_path / "serial"
    parallel = tmp_path / "parallel"
    prepare_data(sources, serial, ByteTokenizer(), val_fraction=0.2, workers=1, unit_bytes=2000, progress=False)
    prepare_data(sources, parallel, ByteTokenizer(), val_fraction=0.2, workers=2, unit_bytes=2000, progress=False)
    a, b = _all_tokens(serial), _all_tokens(parallel)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # Interrupted run: one unit lost its done-marker and left a partial temp file behind.
    markers = sorted((parallel / "shards" / "c").glob("*.json"))
    assert len(markers) >= 3
    stamp = {m: m.stat().st_mtime_ns for m in markers}
    markers[1].unlink()
    (parallel / "shards" / "c" / "00001.train.bin.tmp").write_bytes(b"partial")
    prepare_data(sources, parallel, ByteTokenizer(), val_fraction=0.2, workers=1, unit_bytes=2000, progress=False)
    assert markers[1].exists()
    assert all(m.stat().st_mtime_ns == stamp[m] for m in markers if m != markers[1])  # others kept
    c = _all_tokens(parallel)
    assert all(np.array_equal(a[k], c[k]) for k in a)
    assert not list((parallel / "shards" / "c").glob("*.tmp"))


def test_formats_text_jsonl_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.py").write_text("print('hi')\n")
    (tmp_path / "txt" / "b.md").write_text("# title\n")
    (tmp_path / "txt" / "skip.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"content": ["alpha", "beta", None]}), tmp_path / "e.parquet")
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"""
- {{name: code, paths: [{tmp_path / "txt"}], weight: 0.5, glob: "**/*"}}
- {{name: qa, paths: [{tmp_path / "d.jsonl"}], weight: 0.3, text_key: body}}
- {{name: wiki, paths: [{tmp_path / "e.parquet"}], weight: 0.2, text_key: content}}
""")
    sources = load_mix(mix)
    out = tmp_path / "out"
    meta = prepare_data(sources, out, ByteTokenizer(), val_fraction=0.0, workers=1, progress=False)
    assert {n: c["documents"] for n, c in meta["components"].items()} == {"code": 2, "qa": 2, "wiki": 2}
    tokens = _all_tokens(out)
    expected = ByteTokenizer().encode("one", True, True) + ByteTokenizer().encode("two", True, True)
    assert tokens["qa/train"].tolist() == expected
    assert bytes(t for t in tokens["wiki/train"].tolist() if t < 256) == b"alphabeta"

    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_data([Source("bad", [str(tmp_path / "bad.jsonl")])], tmp_path / "o2", ByteTokenizer(), workers=1,
                     progress=False)  # fmt: skip
    with pytest.raises(UserError, match="no 'text' field"):
        prepare_data([Source("bad", [str(tmp_path / "d.jsonl")])], tmp_path / "o3", ByteTokenizer(), workers=1,
                     progress=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing"):
        prepare_data([Source("x", [str(tmp_path / "missing")])], tmp_path / "o4", ByteTokenizer(), progress=False)


def test_loader_windows_mix_and_ranks(prepared: Path) -> None:
    loader = PackedLoader(prepared, seq_len=32, micro_batch_size=4, grad_accum_steps=2, seed=3)
    steps = [loader.next_step() for _ in range(40)]
    b = steps[0][0]
    assert b["tokens"].shape == (4, 32) and b["targets"].shape == (4, 32) and b["tokens"].dtype == torch.int64
    # targets are the inputs shifted by one within the same window
    assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])
    # the mix: 3:1 between the components' draws
    drawn = loader.state.drawn
    assert 0.65 < drawn["web"] / sum(drawn.values()) < 0.85
    # two ranks with half the micro-batch see exactly the global batch of one process
    ranks = [PackedLoader(prepared, 32, 2, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for step in steps[:5]:
        parts = [rk.next_step() for rk in ranks]
        for m in range(2):
            joined = torch.cat([parts[0][m]["tokens"], parts[1][m]["tokens"]])
            assert torch.equal(joined, step[m]["tokens"])


def test_loader_state_is_exact(prepared: Path) -> None:
    a = PackedLoader(prepared, 48, 3, seed=7)
    for _ in range(25):  # past an epoch of the smaller component
        a.next_step()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    b = PackedLoader(prepared, 48, 3, seed=7)
    b.load_state_dict(state)
    for _ in range(10):
        x, y = a.next_step()[0], b.next_step()[0]
        assert torch.equal(x["tokens"], y["tokens"])
    with pytest.raises(UserError, match="seq_len"):
        PackedLoader(prepared, 64, 3, seed=7).load_state_dict(state)


def test_epochs_cover_every_window(prepared: Path) -> None:
    loader = PackedLoader(prepared, 64, 1, seed=1, mix={"books": 1.0, "web": 0.0})
    n = loader.chunks["books"]
    starts = set()
    for _ in range(n):
        loader.next_step()
    assert loader.state.drawn == {"books": n}
    loader2 = PackedLoader(prepared, 64, 1, seed=1, mix={"books": 1.0})
    starts = {loader2._window_start("books", k) for k in range(n)}
    assert starts == {j * 64 for j in range(n)}  # a permutation of all windows
    assert [loader2._window_start("books", k) for k in range(n)] != sorted(starts)  # shuffled


def test_document_mask() -> None:
    tokens = torch.tensor([[5, 257, 256, 6, 7, 257, 256, 8]])
    mask = document_mask(tokens, bos_id=256, eos_id=257)[0, 0]
    assert mask.shape == (8, 8)
    assert mask[1, 0] and not mask[2, 1] and mask[4, 2] and not mask[6, 5] and mask[7, 6]
    assert not mask.triu(1).any()


def test_validation_set_is_fixed(prepared: Path) -> None:
    val = ValidationSet(prepared, 32, 2, batches=3)
    first, second = list(val), list(val)
    assert len(first) == 3 and all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(first, second))
    halves = [list(ValidationSet(prepared, 32, 1, batches=3, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][0]["tokens"], halves[1][0]["tokens"]]), first[0]["tokens"])
