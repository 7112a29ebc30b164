"""Sliding-window perplexity: window arithmetic, batching, KL statistics, and agreement with Hugging Face
transformers and llama.cpp on the same tokens and windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamaforge.config import get_preset
from llamaforge.evaluate.perplexity import combine, perplexity, sliding_windows
from llamaforge.model import build_model

TEXT = (Path(__file__).parent / "data" / "ppl_text.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(("n", "context", "stride"), [(10, 4, 2), (10, 4, 4), (11, 4, 3), (5, 8, 4), (100, 16, 1)])
def test_windows_score_every_token_once_with_enough_history(n: int, context: int, stride: int) -> None:
    windows = sliding_windows(n, context, stride)
    scored = [t for _, e, f in windows for t in range(f, e)]
    assert scored == list(range(1, n))
    for b, e, f in windows:
        assert 0 <= b < f <= e <= n and e - b <= context
        assert f - b >= min(max(context - stride, 1), f)  # history before the first scored token
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def _window_nll(model, ids: list[int], context: int, stride: int) -> torch.Tensor:
    """Each window on its own, logits for the whole window, NLL of its new tokens."""
    out = []
    with torch.inference_mode():
        for b, e, f in sliding_windows(len(ids), context, stride):
            logp = F.log_softmax(model(torch.tensor([ids[b:e]]))[0].double(), dim=-1)
            out += [-float(logp[t - 1 - b, ids[t]]) for t in range(f, e)]
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    a = build_model(get_preset("tiny")).eval()
    b = build_model(get_preset("tiny")).eval()
    with torch.no_grad():  # b: a perturbed copy of a, as a quantized model would be
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa + 0.01 * torch.randn_like(pa))
    return a, b


@pytest.mark.parametrize(("context", "stride", "batch"), [(32, 16, 1), (32, 16, 3), (32, 32, 2), (40, 7, 4)])
def test_perplexity_matches_window_by_window(models, context: int, stride: int, batch: int) -> None:
    model, _ = models
    ids = [int(i) for i in torch.randint(0, 512, (101,), generator=torch.Generator().manual_seed(1))]
    r = perplexity(model, ids, context=context, stride=stride, batch_size=batch, n_bytes=250, progress=False)
    expected = _window_nll(model, ids, context, stride)
    assert r.n_tokens == 100
    assert torch.allclose(r.token_nll, expected, atol=1e-4, rtol=0)
    assert r.ppl == pytest.approx(math.exp(float(expected.mean())), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(float(expected.sum()) / math.log(2) / 250, rel=1e-5)
    assert r.ppl_stderr > 0


def test_kl_divergence_and_top1_agreement(models) -> None:
    a, b = models
    ids = [int(i) for i in torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(2))]
    same = perplexity(a, ids, context=32, stride=16, reference=a, progress=False)
    assert same.kl.mean == pytest.approx(0.0, abs=1e-6) and same.kl.top1 == 1.0
    assert same.kl.reference_ppl == pytest.approx(same.ppl, rel=1e-6)

    r = perplexity(b, ids, context=32, stride=16, reference=a, batch_size=2, progress=False)
    # Manual: the first window (tokens 1..31) scored from the full distributions of both models.
    with torch.inference_mode():
        lp_a = F.log_softmax(a(torch.tensor([ids[:32]]))[0].double(), -1)
        lp_b = F.log_softmax(b(torch.tensor([ids[:32]]))[0].double(), -1)
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(-1)[:31]
    assert torch.allclose(r.kl.kl[:31], kl, atol=1e-5)
    top = (lp_a.argmax(-1) == lp_b.argmax(-1))[:31]
    assert torch.equal(r.kl.same_top[:31], top)
    assert r.kl.mean > 0 and 0 <= r.kl.top1 <= 1
    d = r.to_dict()
    assert d["ln_ppl_ratio"] == pytest.approx(math.log(r.ppl / r.kl.reference_ppl), abs=1e-9)
    assert d["max_kl"] >= d["p99_kl"] >= d["median_kl"] >= 0

    both = combine([same, r])
    assert both.n_tokens == same.n_tokens + r.n_tokens and both.kl.kl.numel() == both.n_tokens


def test_reference_with_other_vocabulary_is_rejected(models) -> None:
    a, _ = models
    other = build_model(get_preset("tiny").replace(vocab_size=300)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(a, [1, 2, 3], reference=other, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(a, [1], progress=False)


def test_tiny_hf_model_matches_transformers(tiny_hf_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import llamaforge

    llm = llamaforge.load(tiny_hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(TEXT, bos=True)
    r = perplexity(llm.model, ids, context=128, stride=48, batch_size=3, progress=False)
    assert torch.allclose(r.token_nll, _window_nll(lambda x: hf(x).logits, ids, 128, 48), rtol=1e-4, atol=1e-5)


# SmolLM2-135M (the built-in model) against transformers and llama.cpp --------------------------------------
def _llama_cpp_nll(path: Path, ids: list[int], context: int, stride: int) -> torch.Tensor:
    """NLLs computed from llama.cpp's logits, window by window, on exactly our tokens."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False, n_threads=2)
    try:
        out = []
        for b, e, f in sliding_windows(len(ids), context, stride):
            llm.reset()
            llm.eval(ids[b:e])
            logp = F.log_softmax(torch.from_numpy(np.array(llm.scores[: e - b], dtype=np.float64)), -1)
            out += [-float(logp[t - 1 - b, ids[t]]) for t in range(f, e)]
        return torch.tensor(out, dtype=torch.float64)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path):
    import llamaforge

    return llamaforge.load(smollm2_gguf, dtype=torch.float32)  # the Q4_1/Q8_0 weights, dequantized


def _compare_smollm2(smollm2, smollm2_gguf: Path, tmp: Path, n_tokens: int, context: int, stride: int,
                     f32_gguf: bool) -> None:  # fmt: skip
    transformers = pytest.importorskip("transformers")
    from llamaforge.checkpoint import save_model

    ids = smollm2.tokenizer.encode(TEXT)[:n_tokens]
    ours = perplexity(smollm2.model, ids, context=context, stride=stride, batch_size=2, progress=False)

    # transformers on the same weights, converted by our Hugging Face writer.
    save_model(smollm2.model, tmp / "hf", "hf", tokenizer=smollm2.tokenizer)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    hf_nll = _window_nll(lambda x: hf(x).logits, ids, context, stride)
    assert ours.ppl == pytest.approx(math.exp(float(hf_nll.mean())), rel=1e-4)
    assert torch.allclose(ours.token_nll, hf_nll, rtol=1e-3, atol=1e-3)

    pytest.importorskip("llama_cpp")
    # llama.cpp on the original quantized file: its activations are quantized too, so close, not equal.
    q_nll = _llama_cpp_nll(smollm2_gguf, ids, context, stride)
    assert math.exp(float(q_nll.mean())) == pytest.approx(ours.ppl, rel=0.01)
    if f32_gguf:
        save_model(smollm2.model, tmp / "f32.gguf", "gguf", tokenizer=smollm2.tokenizer, dtype=torch.float32)
        f_nll = _llama_cpp_nll(tmp / "f32.gguf", ids, context, stride)
        assert math.exp(float(f_nll.mean())) == pytest.approx(ours.ppl, rel=1e-3)


def test_smollm2_short(smollm2, smollm2_gguf: Path, tmp_path: Path) -> None:
    _compare_smollm2(smollm2, smollm2_gguf, tmp_path, n_tokens=96, context=64, stride=32, f32_gguf=False)


@pytest.mark.slow
def test_smollm2_full_text_with_f32_gguf(smollm2, smollm2_gguf: Path, tmp_path: Path) -> None:
    _compare_smollm2(smollm2, smollm2_gguf, tmp_path, n_tokens=10_000, context=256, stride=128, f32_gguf=True)
