"""The size axis of benchmarks/bench_generate.py. The model-file writer (benchmarks/model_files.py): a tiny random
GGUF written tensor by tensor opens in llamaforge and in llama.cpp, and both compute the same logits from it;
(slow) so does llama.cpp's quantization of it. The benchmark's pieces: both engines' workers on that file, the
memory guard, the option parser and the table's ratios and bandwidth limit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_generate as bg
import model_files as mf

# dim 256 so that the K-quant formats (256-wide blocks) apply to every matrix, as at the real shapes.
TINY = mf.Shape("tiny", "test shape", dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512, context=4096)
TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny_f16(smollm2_gguf, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")  # the writer checks that llama.cpp opens what it wrote
    return mf.write_random_gguf(tmp_path_factory.mktemp("bench") / "tiny.F16.gguf", TINY, smollm2_gguf, seed=3)


def _logits_both(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of TEXT from llamaforge's default load and from llama.cpp, [T, V] each."""
    from llama_cpp import Llama

    import llamaforge

    llm = llamaforge.load(path)
    ids = llm.require_tokenizer().encode(TEXT)
    with torch.inference_mode():
        ours = llm.model(torch.tensor([ids]))[0].float()
    cpp = Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        assert cpp.tokenize(TEXT.encode(), add_bos=False) == ids  # the copied vocabulary tokenizes alike
        cpp.eval(ids)
        theirs = torch.from_numpy(np.array(cpp.scores[: len(ids)], dtype=np.float32))
    finally:
        cpp.close()
    return ours, theirs


def test_random_gguf_has_the_shape_the_tokenizer_and_f16_weights(tiny_f16, smollm2_gguf) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(tiny_f16)
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [name for name, _ in TINY.tensors()]
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [256, 128]  # GGUF order: [in, out]
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    assert np.all(np.asarray(tensors["blk.0.ffn_norm.weight"].data) == 1)
    w = np.asarray(tensors["blk.0.ffn_up.weight"].data, dtype=np.float32)
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["llama.vocab_size"].contents() == 49152
    copied = mf.tokenizer_fields_of(reader)
    assert copied == mf.tokenizer_fields(smollm2_gguf)  # the whole vocabulary, with its value types
    assert any(key == "tokenizer.ggml.merges" for key, *_ in copied)
    assert mf.weight_bytes_per_token(tiny_f16) == sum(int(t.n_bytes) for t in reader.tensors)  # tied head


def test_random_gguf_is_seeded(tiny_f16, smollm2_gguf, tmp_path) -> None:
    again = mf.write_random_gguf(tmp_path / "again.gguf", TINY, smollm2_gguf, seed=3)
    assert again.read_bytes() == tiny_f16.read_bytes()


def test_llamaforge_and_llama_cpp_read_the_same_model(tiny_f16) -> None:
    ours, theirs = _logits_both(tiny_f16)
    assert ours.std() > 0.1  # not a degenerate model: the comparison below means something
    torch.testing.assert_close(ours, theirs, atol=0.01, rtol=0.01)


def test_failed_write_leaves_no_file(tmp_path) -> None:
    def boom() -> np.ndarray:
        raise RuntimeError("generator failed")

    tensors = [("a.weight", (4, 4), lambda: np.zeros((4, 4), np.float16)), ("b.weight", (4, 4), boom)]
    with pytest.raises(RuntimeError, match="generator failed"):
        mf.write_gguf(tmp_path / "x.gguf", [], tensors, desc="x")
    assert list(tmp_path.iterdir()) == []


def test_wrong_tensor_shape_names_the_tensor(tmp_path) -> None:
    tensors = [("blk.0.attn_q.weight", (4, 4), lambda: np.zeros((4, 2), np.float16))]
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight .*\(4, 2\)"):
        mf.write_gguf(tmp_path / "x.gguf", [], tensors, desc="x")
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_refused_with_the_numbers(tmp_path, monkeypatch) -> None:
    class Usage:
        free = 3 * 10**9

    monkeypatch.setattr(mf.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(OSError, match=r"needs about 14\.4 GB .* 3\.0 GB free"):
        mf.check_free_space(tmp_path, mf.estimated_bytes(mf.SHAPES["8b"].n_params, "f16"), "8b f16")


def test_shapes_match_the_models_they_stand_for() -> None:
    assert round(mf.SHAPES["8b"].n_params / 1e9, 2) == 7.18  # Llama-3.1-8B with a 49K vocabulary, tied
    assert round(mf.SHAPES["1b"].n_params / 1e9, 2) == 1.07
    with pytest.raises(ValueError, match="unknown format 'q3_k'"):
        mf.model_path("1b", "q3_k")


@pytest.mark.slow
def test_llama_cpp_quantization_opens_in_both(tiny_f16, tmp_path) -> None:
    from gguf import GGUFReader

    path = mf.quantize_gguf(tiny_f16, tmp_path / "tiny.Q4_K_M.gguf", "q4_k_m", threads=1)
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"  # the tied head's type
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.Q4_K_M.gguf"]  # no temporary left
    ours, theirs = _logits_both(path)
    # llama.cpp multiplies 8-bit activations by the blocks; llamaforge may not: close, not equal.
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()


def test_both_engines_workers_measure_the_same_greedy_run(tiny_f16) -> None:
    ids = list(range(1000, 1080))
    ours = bg.size_worker_llamaforge(str(tiny_f16), {}, ids, 5, threads=1)
    theirs = bg.size_worker_llamacpp(str(tiny_f16), {}, ids, 5, threads=1)
    for row in (ours, theirs):
        assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["peak_rss_mb"] > 50
    assert ours["first_tokens"] == theirs["first_tokens"]  # the same F16 model, greedy: the same 6 tokens
    assert len(ours["first_tokens"]) == 6
    f32 = bg.size_worker_llamaforge(str(tiny_f16), {"dtype": "float32"}, ids, 5, threads=1)
    assert f32["first_tokens"] == ours["first_tokens"]


def test_guard_kills_a_run_over_its_memory_limit() -> None:
    def run(code: str, max_rss_gb: float = 1.0, timeout_s: float = 60) -> dict:
        return bg.run_guarded([sys.executable, "-c", code], {}, max_rss_gb, timeout_s)

    start = time.monotonic()
    row = run("import time\nx = bytearray(400 << 20)\ntime.sleep(30)", max_rss_gb=0.2)
    assert row == {"error": "killed: resident memory passed 0.2 GiB (--max-rss-gb)"}
    assert time.monotonic() - start < 20
    assert run("import time; time.sleep(30)", timeout_s=0.5) == {"error": "killed: took over 0.5 s (--timeout)"}
    assert run("import json; print('RESULT ' + json.dumps({'a': 1}))") == {"a": 1}
    assert run("raise SystemExit('no such file: x.gguf')") == {"error": "no such file: x.gguf"}


def test_options_parse_into_keyword_arguments() -> None:
    assert bg._parse_options("dtype=float32, quantize=gguf,n_ctx=4096,flash_attn=True,adapter=None") == {
        "dtype": "float32", "quantize": "gguf", "n_ctx": 4096, "flash_attn": True, "adapter": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="'dtype' is not key=value"):
        bg._parse_options("dtype")


def test_table_has_ratios_to_llama_cpp_and_the_bandwidth_limit() -> None:
    contenders = [("lf", "llamaforge `load(path)`", {}), ("cpp", "llama.cpp", {})]
    facts = {("1b", "q4_0"): {"file_gib": 0.6, "weight_bytes": 10**9, "kv_bytes": 32768}}
    rows = {
        ("1b", "q4_0", 512, 0): {"prefill_tps": 150.0, "decode_tps": 10.0, "peak_rss_mb": 2048.0},
        ("1b", "q4_0", 512, 1): {"prefill_tps": 100.0, "decode_tps": 20.0, "peak_rss_mb": 1024.0},
    }
    table = bg.format_size_table("1b", ["q4_0"], [512], contenders, rows, facts, 25.0, long=False).splitlines()
    lf = "| Q4_0 | 0.60 | llamaforge `load(path)` | 150.0 | 10.00 | 2.00 | 1.50x | 0.50x | 2.00x | 25.0 | 40% |"
    assert table[2] == lf
    assert table[3] == "| Q4_0 | 0.60 | llama.cpp | 100.0 | 20.00 | 1.00 | - | - | - | 25.0 | 80% |"
    rows[("1b", "q4_0", 512, 0)] = {"error": "killed: resident memory passed 20 GiB (--max-rss-gb)"}
    table = bg.format_size_table("1b", ["q4_0"], [512], contenders, rows, facts, 25.0, long=False).splitlines()
    assert "| failed: killed: resident memory passed 20 GiB (--max-rss-gb) |" in table[2]
    # Long context: the F16 KV cache of the context is read too (10^9 + 4096 * 32768 bytes per token: 22.0 tok/s).
    rows = {(s, f, 4096, i): r for (s, f, _, i), r in rows.items()}
    table = bg.format_size_table("1b", ["q4_0"], [4096], contenders, rows, facts, 25.0, long=True).splitlines()
    assert table[3] == "| Q4_0 | 0.60 | 4096 | llama.cpp | 100.0 | 20.00 | 1.00 | - | - | - | 22.0 | 91% |"
