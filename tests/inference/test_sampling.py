"""The logits processors against hand-computed distributions, and the sampler's randomness."""

from __future__ import annotations

import math

import pytest
import torch

from llamaforge.inference.sampling import (
    SamplingBatch,
    SamplingParams,
    TokenHistory,
    processed_probs,
    sample_from_probs,
)

P4 = torch.tensor([0.1, 0.2, 0.3, 0.4])
LOGITS4 = P4.log()


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_plain_sampling_is_the_softmax():
    close(processed_probs(LOGITS4, SamplingParams()), [0.1, 0.2, 0.3, 0.4])


def test_temperature():
    # logits [0, ln 2] at T = 0.5 become [0, 2 ln 2]: probabilities 1/5 and 4/5
    close(processed_probs(torch.tensor([0.0, math.log(2)]), SamplingParams(temperature=0.5)), [0.2, 0.8])
    # T = 2 halves them: [0, ln 2 / 2] -> 1 : sqrt(2)
    r = math.sqrt(2)
    close(
        processed_probs(torch.tensor([0.0, math.log(2)]), SamplingParams(temperature=2.0)), [1 / (1 + r), r / (1 + r)]
    )


def test_greedy_is_one_hot_at_the_argmax():
    close(processed_probs(LOGITS4, SamplingParams(temperature=0)), [0, 0, 0, 1])


def test_top_k():
    close(processed_probs(LOGITS4, SamplingParams(top_k=2)), [0, 0, 3 / 7, 4 / 7])
    close(processed_probs(LOGITS4, SamplingParams(top_k=1)), [0, 0, 0, 1])
    close(processed_probs(LOGITS4, SamplingParams(top_k=10)), [0.1, 0.2, 0.3, 0.4])


def test_top_p():
    # keep the most likely tokens until their mass reaches p: 0.4 + 0.3 >= 0.65
    close(processed_probs(LOGITS4, SamplingParams(top_p=0.65)), [0, 0, 3 / 7, 4 / 7])
    close(processed_probs(LOGITS4, SamplingParams(top_p=0.75)), [0, 2 / 9, 3 / 9, 4 / 9])
    close(processed_probs(LOGITS4, SamplingParams(top_p=0.2)), [0, 0, 0, 1])  # always at least one


def test_min_p():
    # threshold = min_p * max prob: 0.6 * 0.4 = 0.24 keeps 0.3 and 0.4
    close(processed_probs(LOGITS4, SamplingParams(min_p=0.6)), [0, 0, 3 / 7, 4 / 7])
    close(processed_probs(LOGITS4, SamplingParams(min_p=0.45)), [0, 2 / 9, 3 / 9, 4 / 9])


def test_temperature_applies_before_top_p():
    # T = 0.5 squares the probabilities: [1, 4, 9, 16] / 30; top_p 0.8 keeps 16/30 + 9/30 = 0.83
    close(processed_probs(LOGITS4, SamplingParams(temperature=0.5, top_p=0.8)), [0, 0, 9 / 25, 16 / 25])


def test_repetition_penalty():
    # seen tokens 0 and 1: positive logit divided (2 -> 1), negative multiplied (-2 -> -4); token 2 unseen
    logits = torch.tensor([2.0, -2.0, 1.0])
    probs = processed_probs(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    expected = torch.tensor([1.0, -4.0, 1.0]).softmax(-1)
    torch.testing.assert_close(probs, expected)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    probs = processed_probs(logits, params, prompt_ids=[3], output_ids=[0, 0, 1])
    # token 0: -0.5 - 2 * 0.25; token 1: -0.5 - 0.25; tokens 2, 3 untouched (3 is only in the prompt)
    torch.testing.assert_close(probs, torch.tensor([-1.0, -0.75, 0.0, 0.0]).softmax(-1))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([3.0, 2.0, 0.0])
    assert processed_probs(logits, SamplingParams(temperature=0)).argmax() == 0
    penalized = processed_probs(logits, SamplingParams(temperature=0, repetition_penalty=2.0), output_ids=[0])
    close(penalized, [0, 1, 0])


def test_rows_with_different_parameters_in_one_batch():
    logits = LOGITS4.expand(4, 4).clone()
    params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(temperature=0), SamplingParams(min_p=0.6)]
    batch = SamplingBatch.build(params, [None] * 4, "cpu")
    probs = batch.probs(logits)
    close(probs[0], [0, 0, 3 / 7, 4 / 7])
    close(probs[1], [0.1, 0.2, 0.3, 0.4])  # no top-k for this row although another row has one
    close(probs[2], [0, 0, 0, 1])
    close(probs[3], [0, 0, 3 / 7, 4 / 7])


def test_sampling_frequencies_match_the_distribution():
    n = 20000
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(n, 4)
    draws = sample_from_probs(probs, [gen] * n)
    freq = torch.bincount(draws, minlength=4).float() / n
    # binomial standard deviation at n = 20000 is <= 0.0035: 5 sigma
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.018, rtol=0)


def test_truncated_tokens_are_never_sampled():
    n = 2000
    params = SamplingParams(top_k=2, seed=1)
    batch = SamplingBatch.build([params] * n, [torch.Generator().manual_seed(i) for i in range(n)], "cpu")
    draws = batch.sample(LOGITS4.expand(n, 4).clone())
    assert set(draws.tolist()) == {2, 3}


def test_a_seed_gives_the_same_draws_whatever_shares_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=1.0, seed=123)

    def draws(params: list[SamplingParams], rows: torch.Tensor, steps: int = 20) -> list[list[int]]:
        batch = SamplingBatch.build(params, [p.make_generator(torch.device("cpu")) for p in params], "cpu")
        return [batch.sample(rows).tolist() for _ in range(steps)]

    alone = [step[0] for step in draws([seeded], logits[1:2])]
    shared = [step[1] for step in draws([SamplingParams(seed=7), seeded, SamplingParams(temperature=0)], logits)]
    assert alone == shared
    assert alone != [step[0] for step in draws([SamplingParams(seed=124)], logits[1:2])]


def test_history_from_ids():
    h = TokenHistory.from_ids([[1, 2]], [[2, 2, 3]], 5)
    assert h.seen[0].tolist() == [False, True, True, True, False]
    assert h.counts[0].tolist() == [0, 0, 2, 1, 0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5), ("max_new_tokens", 0),
     ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("logprobs", -1), ("stop", [""])],
)  # fmt: skip
def test_bad_parameters_raise_clear_errors(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ["END"]
