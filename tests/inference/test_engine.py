"""The generation engine on tiny random models: greedy against a cache-free reference loop, batching,
continuous batching, stop conditions, streaming, logprobs, speculative decoding and bad input."""

from __future__ import annotations

import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.inference import Engine, SamplingParams, StopStringMatcher
from llamaforge.llm import LLM
from llamaforge.model import build_model
from llamaforge.tokenizer import BaseTokenizer, Tokenizer

BOS, EOS, USER, ASSISTANT, END = 256, 257, 258, 259, 260


class ByteTokenizer(BaseTokenizer):
    """Byte-level test tokenizer: ids 0..255 are bytes (so characters span tokens), then specials."""

    def __init__(self) -> None:
        special = {"<s>": BOS, "</s>": EOS, "<user>": USER, "<assistant>": ASSISTANT, "<end>": END}
        super().__init__(special=special, bos_id=BOS, eos_id=EOS, vocab_size=512, extra_stop_ids=[END])

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict) -> bytes:
        return b"".join(bytes([i]) if i < 256 else (b"" if skip_special else b"?") for i in ids)

    def id_to_piece(self, token_id: int) -> str:
        return chr(token_id) if token_id < 256 else "?"

    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        ids = [BOS]
        for m in messages:
            ids += [USER if m["role"] == "user" else ASSISTANT, *m["content"].encode(), END]
        return ids + ([ASSISTANT] if add_generation_prompt else [])

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kw) -> list[int]:
        return self.format_chat(messages, add_generation_prompt)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return super().decode(ids, skip_special=skip_special)


def test_the_test_tokenizer_is_a_tokenizer():
    assert isinstance(ByteTokenizer(), Tokenizer)


def tiny_llm(preset: str = "tiny", seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    model = build_model(get_preset(preset, **overrides)).eval()
    return LLM(model=model, tokenizer=ByteTokenizer(), config=model.config, source=preset)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return tiny_llm()


def reference_greedy(llm: LLM, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: no cache, no engine."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(llm.model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "tiny-moe"])
def test_greedy_matches_the_reference_loop(preset):
    llm = tiny_llm(preset)
    ids = ByteTokenizer().encode("hello, world: the prompt crosses a chunk", bos=True)
    out = llm.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True)
    assert out.token_ids == reference_greedy(llm, ids, 24)
    assert out.finish_reason == "length" and out.prompt_tokens == len(ids)


def test_chunked_prefill_matches_one_pass(llm):
    ids = list(range(1, 200))
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    results = []
    for chunk in (512, 16):
        engine = Engine(llm, max_batch=1, max_seq_len=256, prefill_chunk=chunk)
        results.append(engine.run([engine.add(ids, params)])[0].token_ids)
    assert results[0] == results[1] == reference_greedy(llm, ids, 8)


def test_a_batch_equals_each_prompt_alone(llm):
    prompts = ["a", "a much longer prompt than the others", "xyz", "héllo wörld"]
    batch = llm.generate(prompts, max_new_tokens=16, temperature=0, ignore_eos=True)
    assert isinstance(batch, list) and len(batch) == 4
    for prompt, result in zip(prompts, batch):
        alone = llm.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_more_prompts_than_slots_are_queued(llm):
    prompts = [[BOS, *f"prompt {i}".encode()] for i in range(5)]
    batch = llm.generate(prompts, max_new_tokens=6, temperature=0, ignore_eos=True, max_batch=2)
    assert [r.token_ids for r in batch] == [reference_greedy(llm, p, 6) for p in prompts]


def test_seeded_sampling_in_a_batch_equals_alone(llm):
    opts = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    batch = llm.generate(["first", "second prompt"], **opts)
    assert batch[1].token_ids == llm.generate("second prompt", **opts).token_ids


def test_continuous_batching_join_leave_and_cancel(llm):
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    prompts = {name: ByteTokenizer().encode(name, bos=True) for name in ("alpha", "beta prompt", "gamma", "delta!")}
    engine = Engine(llm, max_batch=2, max_seq_len=64)
    a = engine.add(prompts["alpha"], params)
    engine.step()
    engine.step()
    b = engine.add(prompts["beta prompt"], params)  # joins a running batch
    c = engine.add(prompts["gamma"], params)  # waits for a free slot
    engine.step()
    engine.cancel(a)  # frees slot 0 at once: gamma takes it at the next step, beta sits in slot 1
    d = engine.add(prompts["delta!"], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    tokens: dict[int, list[int]] = {a: [], b: [], c: [], d: []}
    finish: dict[int, str] = {}
    while engine.has_work:
        for ev in engine.step():
            tokens[ev.handle] += ev.token_ids
            if ev.finished:
                finish[ev.handle] = ev.finish_reason
    assert finish == {a: "cancelled", b: "length", c: "length", d: "length"}
    for name, h, n in (("beta prompt", b, 10), ("gamma", c, 10), ("delta!", d, 3)):
        result = engine.result(h)
        assert result.token_ids == reference_greedy(llm, prompts[name], n), name
        assert len(result.token_ids) == n
    assert engine.slots == [None, None]


def test_a_fixed_seed_gives_the_same_text(llm):
    opts = dict(max_new_tokens=20, temperature=0.8, top_k=40, seed=1234, ignore_eos=True)
    first = llm.generate("once upon a time", **opts)
    assert llm.generate("once upon a time", **opts).token_ids == first.token_ids
    assert llm.generate("once upon a time", **{**opts, "seed": 1235}).token_ids != first.token_ids


def test_stream_yields_the_same_text_as_generate(llm):
    opts = dict(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    pieces = list(llm.stream("héllo", **opts))
    assert "".join(pieces) == llm.generate("héllo", **opts).text
    assert all(pieces)


def test_stream_closed_early_frees_the_engine(llm):
    it = llm.stream("abc", max_new_tokens=50, temperature=0, ignore_eos=True)
    next(it)
    it.close()
    assert llm.generate("abc", max_new_tokens=5, temperature=0, ignore_eos=True).finish_reason == "length"


def test_stop_token_ends_generation(llm):
    ids = ByteTokenizer().encode("stop here", bos=True)
    free = reference_greedy(llm, ids, 8)
    stop_at = free[3]
    out = llm.generate(ids, max_new_tokens=8, temperature=0, stop_token_ids=[stop_at])
    first = free.index(stop_at)
    assert out.finish_reason == "stop"
    assert out.token_ids == free[: first + 1]  # the stop token is reported, its text is not
    assert out.text == ByteTokenizer().decode(free[:first]).rstrip("\ufffd") or out.text


def test_stop_string_spanning_tokens_is_not_emitted(llm):
    # Every character spans at least one byte token; the stop string spans several.
    full = llm.generate("a prompt", max_new_tokens=40, temperature=0, ignore_eos=True)
    text = full.text
    stop = next(text[i : i + 3] for i in range(5, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    out = llm.generate("a prompt", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    streamed = "".join(llm.stream("a prompt", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert streamed == out.text


def test_stop_string_matcher_holds_back_possible_starts():
    m = StopStringMatcher(["<|end|>", "STOP"])
    assert m.push("Hello <") == ("Hello ", False)
    assert m.push("|e") == ("", False)
    assert m.push("nd|> trailing") == ("", True)
    m = StopStringMatcher(["<|end|>"])
    assert m.push("a <|") == ("a ", False)
    assert m.push("x") == ("<|x", False)  # a false alarm is released
    assert m.push("tail <", final=True) == ("tail <", False)


def test_incremental_detokenizer_emits_complete_characters_only():
    tok = ByteTokenizer()
    ids = list("aé€😀".encode())
    detok = tok.decoder()
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == "aé€😀"
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["a", "é", "€", "😀"]
    primed = tok.decoder(context=list(b"ab"))  # the context's text is not emitted
    assert primed.add(ord("c")) == "c" and primed.flush() == ""


def test_logprobs(llm):
    ids = ByteTokenizer().encode("logprobs", bos=True)
    out = llm.generate(ids, max_new_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    assert len(out.logprobs) == 4
    seq = ids + out.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(llm.model(torch.tensor([seq]))[0].float(), -1)
    for i, entry in enumerate(out.logprobs):
        row = ref[len(ids) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert len(entry.top) == 3
        assert entry.top[0].token_id == entry.token_id  # greedy picks the top one
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
    assert llm.generate(ids, max_new_tokens=2).logprobs is None


def test_chat_uses_the_chat_format(llm):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, max_new_tokens=5, temperature=0, ignore_eos=True)
    prompt = ByteTokenizer().format_chat(messages)
    assert out.prompt_tokens == len(prompt)
    assert out.token_ids == reference_greedy(llm, prompt, 5)
    assert "".join(llm.chat(messages, stream=True, max_new_tokens=5, temperature=0, ignore_eos=True)) == out.text


def test_generation_stops_at_the_end_of_the_context(llm):
    ids = [1] * (llm.config.max_seq_len - 3)
    out = llm.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_target_greedy(llm, k):
    ids = ByteTokenizer().encode("speculate", bos=True)
    target = llm.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True).token_ids
    same = llm.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True, draft=llm, num_speculative=k)
    assert same.token_ids == target
    other = tiny_llm("tiny", seed=5, n_layers=1)
    diff = llm.generate(ids, max_new_tokens=30, temperature=0, ignore_eos=True, draft=other, num_speculative=k)
    assert diff.token_ids == target and diff.finish_reason == "length"


def test_speculative_sampling_is_seeded_and_respects_stops(llm):
    other = tiny_llm("tiny", seed=5, n_layers=1)
    params = SamplingParams(max_new_tokens=25, temperature=0.8, top_k=50, seed=9, ignore_eos=True)
    ids = ByteTokenizer().encode("x", bos=True)

    def run(p: SamplingParams):
        return llm.generate(ids, draft=other, num_speculative=4, **vars(p))

    first = run(params)
    assert run(params).token_ids == first.token_ids
    assert len(first.token_ids) == 25
    stop_tok = first.token_ids[5]
    stopped = run(params.replace(stop_token_ids=[stop_tok]))
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop_tok
    assert stop_tok not in stopped.token_ids[:-1]


def test_speculative_sampling_keeps_the_target_distribution():
    """One step: the first token's frequencies from draft-then-verify match the target's distribution."""
    target, draft = tiny_llm("tiny", seed=0, vocab_size=8), tiny_llm("tiny", seed=1, vocab_size=8)
    ids = [1, 2, 3]
    with torch.inference_mode():
        logits = target.model(torch.tensor([[*ids, 0]]))[0].float()
    n = 300
    counts = torch.zeros(8)
    for seed in range(n):  # second token is produced by the verification step
        out = target.generate(ids, max_new_tokens=2, seed=seed, draft=draft, num_speculative=1)
        if out.token_ids[0] == 0:
            counts[out.token_ids[1]] += 1
    p = logits[-1].softmax(-1)
    total = counts.sum()
    assert total > 10
    assert (counts / total - p).abs().max() < 4 * (0.25 / total).sqrt() + 0.02


@pytest.mark.parametrize(
    ("options", "message"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
     ({"top_p": 0}, "top_p"), ({"bogus": 1}, "bogus")],
)  # fmt: skip
def test_bad_options_raise_value_errors(llm, options, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("x", **options)


def test_prompts_that_do_not_fit_raise(llm):
    with pytest.raises(ValueError, match="context of 256"):
        llm.generate([1] * 300, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([1, 99999], max_new_tokens=4)


def test_text_prompt_without_tokenizer_is_an_error():
    llm = tiny_llm()
    llm.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text", max_new_tokens=2)
    assert len(llm.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).token_ids) == 2


@pytest.mark.slow
def test_compiled_decode_matches_eager(llm):
    ids = ByteTokenizer().encode("compile", bos=True)
    eager = llm.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    compiled = llm.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True, compile=True)
    assert compiled.token_ids == eager.token_ids


# Batched prefill, the prefill budget and prompt logprobs -------------------------------------------------------
def _forward_counter(engine: Engine) -> list[int]:
    """Counts the forwards of the engine's step (whichever it is)."""
    calls = [0]
    forward = engine.step_fn.forward

    def counted(*args, **kw):
        calls[0] += 1
        return forward(*args, **kw)

    engine.step_fn.forward = counted
    return calls


def _drain(engine: Engine, tokens: dict[int, list[int]]) -> list[list[int]]:
    """Step until idle; returns, per step, the handles that received a token (and extends `tokens`)."""
    steps = []
    while engine.has_work:
        got = []
        for ev in engine.step():
            tokens.setdefault(ev.handle, []).extend(ev.token_ids)
            if ev.token_ids:
                got.append(ev.handle)
        steps.append(got)
    return steps


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "tiny-moe"])
def test_arrivals_are_prefilled_together_in_one_forward(preset):
    llm = tiny_llm(preset)
    prompts = [[BOS, *text.encode()] for text in ("a", "a much longer prompt than the others", "xyz", "héllo")]
    engine = Engine(llm, max_batch=4, max_seq_len=256)
    calls = _forward_counter(engine)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    handles = [engine.add(p, params) for p in prompts]
    first = engine.step()
    assert calls[0] == 1  # one padded forward for all four prompts
    assert sorted(ev.handle for ev in first) == handles and all(len(ev.token_ids) == 1 for ev in first)
    tokens = {ev.handle: list(ev.token_ids) for ev in first}
    _drain(engine, tokens)
    for h, p in zip(handles, prompts):
        assert tokens[h] == reference_greedy(llm, p, 12)
        assert engine.result(h).token_ids == tokens[h]


def test_budget_interleaves_a_long_prompt_with_running_decodes(llm):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    short, long = [BOS, *b"running"], [BOS, *(b"a long prompt, " * 7)]  # 106 tokens
    engine = Engine(llm, max_batch=2, max_seq_len=256, prefill_budget=16)
    a = engine.add(short, params)
    tokens = {a: engine.step()[0].token_ids}
    b = engine.add(long, params)
    steps = _drain(engine, tokens)
    prefill_steps = -(-len(long) // 16)
    assert all(a in got for got in steps[:prefill_steps])  # the running stream never waits for the prefill
    assert [b in got for got in steps[:prefill_steps]] == [False] * (prefill_steps - 1) + [True]
    assert tokens[a] == reference_greedy(llm, short, 12)
    assert tokens[b] == reference_greedy(llm, long, 12)


@pytest.mark.parametrize("pad_batch", [False, True])  # True: decode batches padded to powers of two (CUDA graphs)
def test_mixed_partial_chunks_and_scattered_slots_equal_each_prompt_alone(llm, pad_batch):
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=7, repetition_penalty=1.3,
                             ignore_eos=True)  # fmt: skip
    prompts = [[BOS, *b"abcd"], [BOS, *(b"x" * 40)], [BOS, *b"twelve chars"], [BOS, *(b"yz" * 15)]]
    engine = Engine(llm, max_batch=5, max_seq_len=128, prefill_budget=24)
    engine._pad_batch = pad_batch
    keep = engine.add([BOS, *b"occupies slot 0"], greedy.replace(max_new_tokens=30))
    gap = engine.add([BOS, *b"leaves"], greedy.replace(max_new_tokens=1))  # frees slot 1: rows are scattered
    engine.step()
    handles = [engine.add(p, sampled if i == 3 else greedy) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {}
    _drain(engine, tokens)
    for h, p in zip(handles[:3], prompts):
        assert tokens[h] == reference_greedy(llm, p, 8)
    alone = Engine(llm, max_batch=1, max_seq_len=128)
    assert tokens[handles[3]] == alone.run([alone.add(prompts[3], sampled)])[0].token_ids
    assert engine.result(keep).finish_reason == "length" and engine.result(gap).token_ids


def test_plan_keeps_padded_rows_within_the_budget(llm):
    engine = Engine(llm, max_batch=6, max_seq_len=128, prefill_budget=24)
    for n in (5, 30, 12, 3):
        engine.add([1] * n, SamplingParams(max_new_tokens=1))
    engine._admit()
    plan = [(len(req.prompt_ids), n) for req, n in engine._plan_prefill()]
    # The oldest first, then shortest first; width 6 completes two prompts and writes the most tokens.
    assert plan == [(5, 5), (3, 3), (12, 6), (30, 6)]
    assert len(plan) * max(n for _, n in plan) <= 24


def test_cancel_during_a_chunked_prefill_frees_the_slot(llm):
    engine = Engine(llm, max_batch=1, max_seq_len=256, prefill_budget=8)
    h = engine.add(list(range(1, 60)), SamplingParams(max_new_tokens=4))
    engine.step()
    engine.cancel(h)
    assert engine.slots == [None]
    ids = [BOS, *b"next"]
    nxt = engine.add(ids, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    tokens: dict[int, list[int]] = {}
    _drain(engine, tokens)
    assert engine.result(h).finish_reason == "cancelled"
    assert tokens[nxt] == reference_greedy(llm, ids, 4)


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_match_a_full_forward(llm, chunk):
    ids = [BOS, *b"score this prompt, please"]
    engine = Engine(llm, max_batch=2, max_seq_len=128, prefill_chunk=chunk)
    other = engine.add([BOS, *b"batched alongside"], SamplingParams(max_new_tokens=3))
    h = engine.add(ids, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2))
    first = []
    while engine.has_work:
        first += [ev for ev in engine.step() if ev.handle == h and ev.token_ids]
    assert first[0].prompt_logprobs is not None and all(ev.prompt_logprobs is None for ev in first[1:])
    result = engine.result(h)
    engine.result(other)
    assert result.prompt_logprobs == first[0].prompt_logprobs
    with torch.inference_mode():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    entries = result.prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for i, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == ids[i] and entry.token == ByteTokenizer().decode([ids[i]])
        assert entry.logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == ref[i - 1].topk(2).indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(ref[i - 1].topk(2).values.tolist(), abs=1e-4)
    assert result.token_ids == reference_greedy(llm, ids, 3)


def test_prompt_logprobs_through_generate(llm):
    out = llm.generate([BOS, 5, 6, 7], max_new_tokens=2, prompt_logprobs=0)
    assert out.prompt_logprobs[0] is None and [e.token_id for e in out.prompt_logprobs[1:]] == [5, 6, 7]
    assert all(e.top == [] for e in out.prompt_logprobs[1:])
    assert llm.generate([BOS, 5], max_new_tokens=2).prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    spec = llm.generate([BOS, 5, 6, 7], max_new_tokens=2, prompt_logprobs=0, draft=llm)
    assert spec.prompt_logprobs == out.prompt_logprobs


def test_the_llm_keeps_its_engine_and_a_busy_one_is_left_alone(llm):
    """generate/stream/chat share one engine (its prefix cache outlives a call); a call while a stream is still
    open gets an engine of its own (sharing the step, so the weights are fused once), and both are right."""
    ids = [BOS, *b"a shared prefix of thirty-two tokens or so"]
    first = llm.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)
    engine = llm.engine()
    again = llm.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert llm.engine() is engine and again.cached_tokens == 32 and again.token_ids == first.token_ids
    stream = llm.stream_events(ids, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    got = list(next(stream).token_ids)
    other = llm.generate([BOS, *b"meanwhile"], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert other.token_ids == reference_greedy(llm, [BOS, *b"meanwhile"], 5)
    got += [t for ev in stream for t in ev.token_ids]
    assert got == reference_greedy(llm, ids, 6)
    assert llm.engine() is engine and engine.idle
    llm.clear_cache()
    assert llm.engine() is not engine
