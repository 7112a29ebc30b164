"""The paged KV cache (llamaforge/inference/cache.py): block allocation, prefix reuse and its exactness, LRU
eviction, and the engine's admission under a memory budget (a full cache queues, a cancel frees)."""

from __future__ import annotations

import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.inference import Engine, PagedKVCache, SamplingParams
from llamaforge.inference.cache import block_hashes
from llamaforge.model import build_model

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny", max_seq_len=512)).eval()


def _cache(num_blocks: int = 9, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(1, 1, 2, num_blocks, block_size=block_size)


def test_admit_reserves_and_release_returns_blocks():
    cache = _cache()  # 8 usable blocks of 4
    a = cache.admit(list(range(10)), 16)
    assert a is not None and a.reserved == 4 and cache.num_free == 4
    assert cache.admit(list(range(50, 70)), 20) is None  # 5 blocks: not promised now
    cache.ensure(a, 10)
    assert len(a.blocks) == 3 and a.reserved == 1 and cache.num_free == 4
    assert 0 not in a.blocks  # block 0 is scratch
    cache.release(a)
    assert cache.num_free == 8 and cache.num_used == 0
    with pytest.raises(ValueError, match="does not fit in a KV cache of 32 tokens"):
        cache.admit([1], 33)


def test_full_blocks_are_shared_by_later_prompts():
    cache = _cache(num_blocks=16)
    tokens = list(range(11))
    a = cache.admit(tokens, 12)
    cache.ensure(a, 11)
    cache.commit(a, tokens, 11)  # two full blocks registered
    assert a.hashes == block_hashes(tokens, 4)
    b = cache.admit([*tokens[:9], 99, 98], 12)  # shares the first two blocks (8 tokens)
    assert b.num_tokens == 8 and b.blocks == a.blocks[:2] and b.reused == 8
    c = cache.admit([*tokens[:3], 7, *tokens[4:]], 12)  # differs inside block 0: nothing shared
    assert c.num_tokens == 0
    # A prompt that is all cached still computes its last token (its logits start the generation).
    d = cache.admit(tokens[:8], 12)
    assert d.num_tokens == 4
    assert cache.hit_tokens == 12


def test_registered_blocks_are_evicted_least_recently_used_first():
    cache = _cache(num_blocks=5)  # 4 usable blocks
    first, second = list(range(8)), list(range(100, 108))
    for tokens in (first, second):
        seq = cache.admit(tokens, 8)
        cache.ensure(seq, 8)
        cache.commit(seq, tokens, 8)
        cache.release(seq)
    assert cache.num_cached == 4 and cache.num_free == 4
    cache.admit([*first, 1], 9)  # touches `first`: `second` becomes the least recently used
    fresh = cache.admit([], 4, reuse=False)
    cache.ensure(fresh, 4)
    assert cache.match(second) == cache.match(second)[:1]  # its later block went first
    assert len(cache.match(first)) == 2


def test_fork_shares_full_blocks_and_copies_the_partial_one(model):
    cache = PagedKVCache.for_model(model, 64, block_size=4)
    seq = cache.sequence(16)
    tokens = torch.randint(0, 512, (1, 6))
    pos = torch.arange(6)[None]
    with torch.inference_mode():
        model(tokens, pos, cache=cache.prepare([seq], pos))
    child = cache.fork(seq, 6, 10)
    assert child.blocks[0] == seq.blocks[0] and child.blocks[1] != seq.blocks[1]
    torch.testing.assert_close(cache.k[:, child.blocks[1], :, :2], cache.k[:, seq.blocks[1], :, :2])


@pytest.mark.parametrize("prefix", [32, 37])  # block-aligned and not
def test_logits_with_a_reused_prefix_equal_a_cold_prefill(model, prefix):
    """The exactness of prefix reuse: computing a prompt's tail against cached prefix blocks gives the logits of
    a cold prefill that runs the same chunks (bit for bit), and of a one-pass prefill (to float rounding)."""
    torch.manual_seed(1)
    prompt = torch.randint(0, 512, (50,)).tolist()
    block = 8
    cached = prefix // block * block

    def prefill(cache: PagedKVCache, seq, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)[None]
        return model(torch.tensor([prompt[start:end]]), pos, cache=cache.prepare([seq], pos))[0, -1]

    with torch.inference_mode():
        warm = PagedKVCache.for_model(model, 256, block_size=block)
        first = warm.admit(prompt[:prefix], 64)
        prefill(warm, first, 0, prefix)
        warm.commit(first, prompt, prefix)
        warm.release(first)
        second = warm.admit(prompt, 64)
        assert second.num_tokens == cached
        reused = prefill(warm, second, cached, len(prompt))

        cold = PagedKVCache.for_model(model, 256, block_size=block)
        seq = cold.sequence(64)
        prefill(cold, seq, 0, cached)
        same_chunks = prefill(cold, seq, cached, len(prompt))
        one_pass = model(torch.tensor([prompt]))[0, -1]
    assert torch.equal(reused, same_chunks)
    torch.testing.assert_close(reused, one_pass, atol=1e-5, rtol=1e-5)


def test_engine_reuses_a_shared_prefix_and_the_greedy_text_is_unchanged(model):
    system = torch.randint(0, 512, (70,)).tolist()
    engine = Engine(model, max_batch=2, max_seq_len=256)
    cold = Engine(model, max_batch=2, max_seq_len=256, prefix_caching=False)
    for question in ([1, 2, 3], [4, 5, 6, 7]):
        h = engine.add(system + question, GREEDY)
        (out,) = engine.run([h])
        (ref,) = cold.run([cold.add(system + question, GREEDY)])
        assert out.token_ids == ref.token_ids and ref.cached_tokens == 0
    assert out.cached_tokens == 64  # four full blocks of the system prompt
    assert engine.stats["cached_tokens"] == 64


def test_generated_tokens_are_cached_for_the_next_turn(model):
    """A chat's next turn starts with the previous prompt and reply: their blocks come from the cache."""
    engine = Engine(model, max_batch=1, max_seq_len=256)
    prompt = torch.randint(0, 512, (30,)).tolist()
    (first,) = engine.run([engine.add(prompt, GREEDY.replace(max_new_tokens=20))])
    turn = prompt + first.token_ids + [9, 9]
    (second,) = engine.run([engine.add(turn, GREEDY)])
    assert second.cached_tokens == (len(prompt) + len(first.token_ids) - 1) // 16 * 16 == 48


def test_a_full_cache_queues_requests_and_a_cancel_frees_blocks(model):
    per_token = PagedKVCache.bytes_per_token(model, torch.float32)
    engine = Engine(model, max_batch=4, max_seq_len=128, cache_memory=64 * per_token)  # 4 blocks of 16
    long = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    a = engine.add(list(range(1, 20)), long)  # 19 + 30 tokens: 4 blocks, all of them
    b = engine.add(list(range(40, 50)), GREEDY)
    engine.step()
    assert engine.requests[a].slot is not None and engine.requests[b].slot is None  # b waits for blocks
    assert list(engine.waiting) == [engine.requests[b]]
    engine.cancel(a)
    assert engine.cache.num_used == 0
    tokens: dict[int, list[int]] = {}
    while engine.has_work:
        for ev in engine.step():
            tokens.setdefault(ev.handle, []).extend(ev.token_ids)
    assert len(tokens[b]) == 6 and engine.result(a).finish_reason == "cancelled"
    with pytest.raises(ValueError, match="context of 64 tokens"):
        engine.add(list(range(1, 70)), GREEDY)  # the cache caps the context


def test_cache_memory_too_small_is_a_clear_error(model):
    with pytest.raises(ValueError, match="cache_memory of 100 bytes holds 0 tokens"):
        Engine(model, cache_memory=100)


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(model):
    engine = Engine(model, max_batch=1, max_seq_len=256)
    prompt = torch.randint(0, 512, (40,)).tolist()
    engine.run([engine.add(prompt, GREEDY)])
    (out,) = engine.run([engine.add(prompt, GREEDY.replace(prompt_logprobs=0))])
    assert out.cached_tokens == 0 and len(out.prompt_logprobs) == 40


# The 8-bit cache --------------------------------------------------------------------------------------------------
def test_q8_0_rows_round_trip_within_half_a_step():
    from llamaforge.inference.cache import q8_0_rows, q8_0_values

    x = torch.randn(3, 5, 64) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1)
    x[0, 0] = 0  # an all-zero row: scale 0, no NaN
    rows = q8_0_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (3, 5, 68)
    back = q8_0_values(rows, 64)
    step = x.unflatten(-1, (2, 32)).abs().amax(-1, keepdim=True) / 127
    # Half a step of rounding, plus the float16 rounding of the scale times |q| <= 127 (2^-11 relative).
    assert ((back - x).unflatten(-1, (2, 32)).abs() <= step * (0.5 + 127 * 2**-11) + 1e-7).all()
    assert torch.equal(back[0, 0], torch.zeros(64))


def _q8_model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny", head_dim=32, max_seq_len=256)).eval()


@torch.inference_mode()
def test_q8_0_cache_close_to_a_float_cache_and_native_equals_torch():
    """Teacher-forced logits through a q8_0 cache stay close to a float32 cache's (KL ~1e-5), and the native decode
    step, which quantizes and reads the rows itself, agrees with the torch path on the same cache type."""
    from llamaforge.inference.step import FastForward

    model = _q8_model()
    tokens = torch.randint(0, 512, (1, 60))
    out = {}
    for kind, fn in (("float32", model), ("q8_0", model), ("q8_0 native", FastForward(model))):
        cache = PagedKVCache.for_model(model, 128, dtype=kind.split()[0])
        seq = cache.sequence(64)
        pos = torch.arange(40)[None]
        logits = [fn(tokens[:, :40], pos, cache=cache.prepare([seq], pos))[0]]
        for t in range(40, 60):  # decode steps: the native op on FastForward
            pos = torch.tensor([[t]])
            logits.append(fn(tokens[:, t : t + 1], pos, cache=cache.prepare([seq], pos))[0])
        out[kind] = torch.cat(logits).float()
        if kind == "q8_0":
            assert cache.k.dtype == torch.int8 and cache.k.shape[-1] == 34
    p = out["float32"].log_softmax(-1)
    kl = (p.exp() * (p - out["q8_0"].log_softmax(-1))).sum(-1)
    assert kl.max() < 1e-3
    torch.testing.assert_close(out["q8_0 native"], out["q8_0"], atol=2e-4, rtol=2e-4)


def test_q8_0_cache_in_the_engine_halves_the_memory():
    model = _q8_model()
    half = PagedKVCache.bytes_per_token(model, torch.float16)
    q8 = PagedKVCache.bytes_per_token(model, "q8_0")
    assert q8 == half * 17 // 32  # 34 bytes per 32 numbers instead of 64
    engine = Engine(model, max_batch=1, max_seq_len=128, cache_dtype="q8_0")
    prompt = torch.randint(0, 512, (40,)).tolist()
    (out,) = engine.run([engine.add(prompt, GREEDY)])
    assert len(out.token_ids) == 6 and engine.cache.cache_type == "q8_0"
    with pytest.raises(ValueError, match="multiple of 32"):
        PagedKVCache(1, 1, 16, 4, dtype="q8_0")
    with pytest.raises(ValueError, match="unknown KV-cache type 'q4'"):
        PagedKVCache(1, 1, 32, 4, dtype="q4")


def test_a_growing_cache_takes_requests_larger_than_its_first_size(model):
    engine = Engine(model, max_batch=2, max_seq_len=512, preallocate=False)
    engine.cache = PagedKVCache.for_model(model, 64)  # start tiny
    prompt = torch.randint(0, 512, (300,)).tolist()
    (out,) = engine.run([engine.add(prompt, GREEDY)])
    assert len(out.token_ids) == 6 and engine.cache.capacity >= 306
    (again,) = engine.run([engine.add(prompt, GREEDY)])  # the prefix survived the growth
    assert again.token_ids == out.token_ids and again.cached_tokens == 288
