"""GGUF blocks run as stored: every block type's matmul and embedding lookup against gguf's own dequantizer, the
modules (fallback and autograd), and the default load keeping a quantized file's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q

import llamaforge
from llamaforge import kernels
from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import model_tensors
from llamaforge.config import get_preset
from llamaforge.errors import CheckpointError
from llamaforge.memory import InsufficientMemoryError
from llamaforge.model import build_model
from llamaforge.quantize import GGUF_BLOCK_TYPES, GGUFEmbedding, GGUFLinear

# Byte offsets of each type's float16 scales: random bytes elsewhere are valid codes, but a random float16 may be
# inf/NaN or huge, so those are set to small positive values.
HALF_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}  # fmt: skip
ROWS = [1, 3, 5, 8, 20]  # decode kernels below 8 rows, the panel GEMM from 8 (on AVX-512 VNNI CPUs)


def random_blocks(qtype: Q, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=gen)
    for off in HALF_OFFSETS[qtype.name]:
        scale = (torch.rand(n, k // block, generator=gen) * 0.02 + 0.001).half()
        raw[:, :, off : off + 2] = scale.view(torch.uint8).view(n, k // block, 2)
    return raw.view(n, -1)


def gguf_dequantize(blocks: torch.Tensor, qtype: Q, k: int) -> torch.Tensor:
    """The gguf package's (numpy) dequantizer: independent of llamaforge's."""
    return torch.from_numpy(quants.dequantize(blocks.numpy(), qtype)).float().view(blocks.shape[0], k)


def int8_activations(x: torch.Tensor, span: int) -> torch.Tensor:
    """x rounded as the kernels (and llama.cpp) round it: int8 times max|x| / 127 per `span` columns."""
    m, k = x.shape
    xb = F.pad(x, (0, -k % span)).view(m, -1, span)
    mx = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(mx > 0, torch.full_like(mx, 127.0) / torch.where(mx > 0, mx, 1), 0)  # not 127 / mx (rounding)
    d = (mx / 127).half().float() if span == 32 else mx / 127  # llama.cpp keeps a Q8_0 block's scale in float16
    return (torch.round(xb * inv) * d).view(m, -1)[:, :k]


def reference_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, k: int) -> torch.Tensor:
    """What the kernels compute, from gguf's dequantized weights: x rounded to 8 bits (`int8_activations`); for
    Q4_1/Q5_1 (w = d q + m) the min meets llama.cpp's Q8_1 block sum float16(scale * sum(q)), not the rounded one."""
    block = GGML_QUANT_SIZES[qtype][0]
    w = gguf_dequantize(blocks, qtype, k)
    if qtype not in (Q.Q4_1, Q.Q5_1):
        return int8_activations(x, block) @ w.T
    size = GGML_QUANT_SIZES[qtype][1]
    mins = blocks.view(blocks.shape[0], -1, size)[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
    xb = x.view(x.shape[0], -1, 32)
    mx = xb.abs().amax(-1)
    inv = torch.where(mx > 0, torch.full_like(mx, 127.0) / torch.where(mx > 0, mx, 1), 0)
    qsum = torch.round(xb * inv[..., None]).sum(-1)
    sums = ((mx / 127) * qsum).half().float()  # [M, K/32]
    return int8_activations(x, 32) @ (w - mins.repeat_interleave(32, 1)).T + sums @ mins.T


def widths(qtype: Q) -> list[int]:
    return [256, 512] if GGML_QUANT_SIZES[qtype][0] == 256 else [96, 288, 512]  # 288: a partial group of blocks


@pytest.fixture(scope="module", autouse=True)
def _native():
    assert kernels.available(), "the native kernels must build on this machine"


@pytest.mark.parametrize("name", GGUF_BLOCK_TYPES)
def test_matmul_equals_dequantized_weights_times_rounded_activations(name):
    qtype = Q[name]
    gen = torch.Generator().manual_seed(0)
    for k in widths(qtype):
        blocks = random_blocks(qtype, 37, k, gen)
        w = gguf_dequantize(blocks, qtype, k)
        info = kernels.gguf_info(qtype, k)
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            ref = reference_matmul(x, blocks, qtype, k)
            tol = 2e-6 * ref.abs().max().item()
            torch.testing.assert_close(kernels.linear(x, blocks, info), ref, rtol=0, atol=tol)
            torch.testing.assert_close(kernels.gguf_linear_reference(x, blocks, info), ref, rtol=0, atol=tol)
            # and close to the float product: 8-bit activations lose about 1% (relative to the largest output)
            assert (kernels.linear(x, blocks, info) - x @ w.T).abs().max() < 0.03 * (x @ w.T).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_accumulating_outputs_agree(threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    blocks = random_blocks(Q.Q4_K, 300, 512, gen)
    w = gguf_dequantize(blocks, Q.Q4_K, 512)
    for m in (1, 30):
        x = torch.randn(m, 512, generator=gen)
        got = kernels.linear(x, blocks, kernels.gguf_info(Q.Q4_K, 512))
        torch.testing.assert_close(got, int8_activations(x, 256) @ w.T, rtol=0, atol=2e-6 * got.abs().max().item())


def test_non_finite_activations_give_nan_rows():
    blocks = random_blocks(Q.Q4_0, 16, 64, torch.Generator().manual_seed(2))
    x = torch.randn(9, 64)
    x[1, 3], x[4, 40] = float("nan"), float("inf")
    for rows in (x[:2], x):  # decode and GEMM kernels
        y = kernels.linear(rows, blocks, kernels.gguf_info(Q.Q4_0, 64))
        assert y[1].isnan().all() and not y[0].isnan().any()
    assert y[4].isnan().all()


def test_bad_blocks_are_refused_naming_the_problem():
    with pytest.raises(RuntimeError, match=r"must be uint8 \[N, 36\]"):
        kernels.linear(torch.randn(1, 64), torch.zeros(4, 35, dtype=torch.uint8), kernels.gguf_info(Q.Q4_0, 64))
    with pytest.raises(RuntimeError, match="has no native kernel"):
        kernels.linear(torch.randn(1, 64), torch.zeros(4, 36, dtype=torch.uint8), kernels.gguf_info(Q.IQ2_XXS, 64))
    with pytest.raises(ValueError, match="not a multiple of its block of 256"):
        GGUFLinear(96, 4, Q.Q4_K)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_linear_module_native_fallback_and_autograd(name):
    qtype = Q[name]
    gen = torch.Generator().manual_seed(3)
    blocks = random_blocks(qtype, 40, 256, gen)
    mod = GGUFLinear(256, 40, qtype, blocks)
    w = gguf_dequantize(blocks, qtype, 256)
    x = torch.randn(2, 3, 256, generator=gen)
    torch.testing.assert_close(mod.dequantize(), w)
    native = mod(x)
    assert native.shape == (2, 3, 40)
    with kernels.disabled():  # no native kernels: dequantized a chunk of rows at a time, float activations
        torch.testing.assert_close(mod(x), x @ w.T, rtol=1e-5, atol=1e-5)
    assert (native - x @ w.T).abs().max() < 0.03 * (x @ w.T).abs().max()
    xg = x.clone().requires_grad_()
    grad = torch.randn(2, 3, 40, generator=gen)
    (mod(xg) * grad).sum().backward()
    torch.testing.assert_close(xg.grad, grad @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", GGUF_BLOCK_TYPES)
def test_embedding_lookup_dequantizes_the_rows(name):
    qtype = Q[name]
    k = 256
    blocks = random_blocks(qtype, 50, k, torch.Generator().manual_seed(4))
    emb = GGUFEmbedding(50, k, qtype, blocks)
    tokens = torch.tensor([[3, 49, 0], [7, 7, 1]])
    torch.testing.assert_close(emb(tokens), gguf_dequantize(blocks, qtype, k)[tokens])
    assert emb.weight is blocks


# Whole models -----------------------------------------------------------------------------------------------
def _tiny_gguf(path, dtype="q8_0", **overrides):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", **overrides)).eval()
    G.write(path, model.config, model_tensors(model), dtype=dtype)
    return model


def _mapped_from(t: torch.Tensor, path) -> bool:
    """Whether t's data lies in a memory mapping of the file at `path` (Linux: /proc/self/maps)."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_default_load_keeps_blocks_and_dtype_dequantizes(tmp_path, capsys):
    _tiny_gguf(tmp_path / "m.gguf", tie_embeddings=True)
    blocks = llamaforge.load(tmp_path / "m.gguf")
    assert blocks.format == "gguf"
    assert isinstance(blocks.model.layers[0].attention.wq, GGUFLinear)
    assert isinstance(blocks.model.tok_embeddings, GGUFEmbedding)
    assert blocks.model.output.blocks is blocks.model.tok_embeddings.weight  # the tied head shares the table
    assert not _mapped_from(blocks.model.layers[0].attention.wq.blocks, tmp_path / "m.gguf")  # read into memory
    mapped = llamaforge.load(tmp_path / "m.gguf", mmap=True)
    assert _mapped_from(mapped.model.layers[0].attention.wq.blocks, tmp_path / "m.gguf")  # no copy
    assert torch.equal(mapped.model.layers[0].attention.wq.blocks, blocks.model.layers[0].attention.wq.blocks)
    floats = llamaforge.load(tmp_path / "m.gguf", dtype=torch.float32)
    assert "dequantizing m.gguf to torch.float32" in capsys.readouterr().err
    assert isinstance(floats.model.layers[0].attention.wq, torch.nn.Linear)
    tokens = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        a, b = blocks.model(tokens), floats.model(tokens)
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # only the 8-bit activations differ
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def _file_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of the file at `path` (Linux: /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_blocks_read_into_memory_are_resident_once(tmp_path):
    """Read into memory, the blocks' file pages are unmapped once copied: the file's mapping keeps only what the
    float tensors (norms) and partial pages at tensor edges still hold."""
    _tiny_gguf(tmp_path / "m.gguf", dtype="q8_0", dim=256, hidden_dim=1024)
    llm = llamaforge.load(tmp_path / "m.gguf")
    blocks = sum(m.blocks.numel() for m in llm.model.modules() if isinstance(m, GGUFLinear))
    assert blocks > 1 << 20
    assert _file_rss_kib(tmp_path / "m.gguf") * 1024 < 0.1 * blocks
    mapped = llamaforge.load(tmp_path / "m.gguf", mmap=True)
    with torch.no_grad():
        tokens = torch.randint(0, 512, (1, 8))
        torch.testing.assert_close(llm.model(tokens), mapped.model(tokens), rtol=0, atol=0)


def test_generation_on_blocks_equals_the_model_forward(tmp_path):
    _tiny_gguf(tmp_path / "m.gguf", dtype="q4_0")
    llm = llamaforge.load(tmp_path / "m.gguf")
    out = llm.generate([1, 2, 3, 4], max_new_tokens=12, temperature=0, ignore_eos=True)
    ids = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[4:]


def test_memory_refusal_names_needed_and_available(tmp_path, monkeypatch):
    _tiny_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr("llamaforge.memory.available_bytes", lambda: 1000)
    too_little = r"m\.gguf needs 1[0-9.]* KB of memory but only 1\.0 KB is available"
    with pytest.raises(InsufficientMemoryError, match=too_little):
        llamaforge.load(tmp_path / "m.gguf")
    with pytest.raises(InsufficientMemoryError, match="without a dtype to run its blocks"):
        llamaforge.load(tmp_path / "m.gguf", dtype=torch.float32)
    monkeypatch.setenv("LLAMAFORGE_SKIP_MEMORY_CHECK", "1")
    assert llamaforge.load(tmp_path / "m.gguf").format == "gguf"


def test_a_type_without_kernel_is_refused_naming_tensor_and_type(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", dim=256, hidden_dim=256)).eval()
    path = tmp_path / "iq2.gguf"
    w = GGUFWriter(path, "llama")
    G._add_model_metadata(w, model.config, None)
    for name, t in model_tensors(model).items():
        if name == "layers.0.feed_forward.w1.weight":  # IQ2_XXS: 66 bytes per 256 weights
            w.add_tensor(G.gguf_name(name), np.zeros((256, 66), np.uint8), raw_dtype=Q.IQ2_XXS)
        else:
            w.add_tensor(G.gguf_name(name), t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate\.weight.* IQ2_XXS, which llamaforge cannot run"):
        llamaforge.load(path)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_1"])
def test_float_model_quantized_to_blocks_runs_and_saves(tmp_path, scheme):
    from llamaforge.quantize import load_quantized, quantize_model, save_quantized

    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
    quantize_model(model, scheme)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, GGUFLinear) and wq.qtype == Q[scheme.upper()]
    with torch.no_grad():
        got = model(tokens)
    assert (got - ref).abs().max() < {"q8_0": 0.05, "q4_0": 0.2, "q4_1": 0.2}[scheme] * ref.abs().max()
    save_quantized(model, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), got)


def test_unknown_block_scheme_lists_the_choices():
    from llamaforge.quantize import parse_scheme

    with pytest.raises(ValueError, match=r"unknown quantization scheme 'q9_0'; choose one of .*q8_0"):
        parse_scheme("q9_0")


@pytest.mark.parametrize("mix", ["q4_k_m", "q6_k", "q8_0"])
def test_quantize_on_load_equals_the_converted_file(tmp_path, mix):
    """`load(checkpoint, quantize=MIX)` builds the same blocks as `convert --quantize MIX` writes (llama.cpp's mix)."""
    from llamaforge.checkpoint import save_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny", dim=256, hidden_dim=512)).eval()
    save_model(model, tmp_path / "hf", "hf")
    G.write(tmp_path / "m.gguf", model.config, model_tensors(model), dtype=mix)
    raw = G.read_raw(tmp_path / "m.gguf")
    llm = llamaforge.load(tmp_path / "hf", quantize=mix)
    checked = 0
    for name, mod in llm.model.named_modules():
        if isinstance(mod, GGUFLinear) and f"{name}.weight" in raw:
            t = raw[f"{name}.weight"]
            assert mod.qtype == t.qtype, name
            assert torch.equal(mod.blocks, t.data), name
            checked += 1
    assert checked == 7 * 2 + 1  # every attention and feed-forward matrix of both layers, and the head
