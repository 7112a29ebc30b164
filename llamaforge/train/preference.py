"""Preference data for DPO and its relatives: a prompt, a chosen and a rejected response per record.

Records (any file ``records.read_records`` reads) take the layouts of Hugging Face TRL's preference datasets:

- plain strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt becomes a user turn and
  each response an assistant turn;
- chat messages: ``{"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}`` (a response may also be a plain string);
- implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, two conversations whose shared leading
  messages are the prompt; also when a plain-string ``prompt`` repeats their first user turn (UltraFeedback's
  layout), as TRL reads it.

Each side is rendered with the model's chat format (or the Alpaca prompt, as in ``sft``) and tokenized; the
response tokens after the prompt (the assistant turn with its end-of-turn marker) are the only ones scored.
Records that cannot be used (a missing field, an empty or identical response, a prompt that fills the context)
are skipped with their location and a count in the log; a file with nothing usable is an error.

Batches put the chosen sequences of a micro-batch first and the rejected ones after them ([2B, T], padded on
the right), as TRL does; ``PairLoader`` serves them to ``Trainer`` like ``sft.SFTLoader`` serves rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .loss import IGNORE_INDEX
from .records import BadExample, DataReport, read_records
from .sft import render_alpaca, render_chat, resolve_template

Messages = list[dict[str, str]]


@dataclass
class Pair:
    index: int  # the record's position in its file: its identity for the train/validation split
    prompt: list[int]
    chosen: list[int]  # response tokens after the prompt
    rejected: list[int]
    chosen_mask: list[bool]  # True: a response token that is scored (False: e.g. a tool turn inside a response)
    rejected_mask: list[bool]
    line: int = 0
    ref_chosen: float | None = None  # the reference model's log-probabilities, once precomputed
    ref_rejected: float | None = None

    @property
    def n_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


# Records as conversations --------------------------------------------------------------------------------------
def _messages(value: Any, field: str, role: str | None = None) -> Messages:
    """A field as a list of {role, content}: a plain string becomes one message of ``role``."""
    if isinstance(value, str):
        if role is None:
            raise BadExample("bad field", f"{field!r} must be a list of messages here")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise BadExample("bad field", f"{field!r} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadExample("bad field", f"{field}[{i}] needs 'role' and 'content' strings")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _whole_conversations(record: dict[str, Any]) -> bool:
    """A plain-string prompt beside chosen/rejected conversations that begin with the prompt's turns themselves
    (UltraFeedback's layout: ``prompt`` repeats the user turn); the turns, not the string, are the prompt then,
    as TRL takes them. Responses that begin with the assistant's turn use the string as the user turn."""
    sides = (record.get("chosen"), record.get("rejected"))
    return isinstance(record.get("prompt"), str) and all(
        isinstance(s, list) and s and isinstance(s[0], dict) and s[0].get("role") not in (None, "assistant")
        for s in sides
    )


def record_pair(record: Any) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of a preference record; BadExample when it cannot be used."""
    if isinstance(record, BadExample):
        raise record
    if not isinstance(record, dict):
        raise BadExample("not an object", f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise BadExample("missing field", f"no {key!r} (preference records need prompt, chosen and rejected)")
    if record.get("prompt") is None or _whole_conversations(record):
        if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
            raise BadExample("missing field", "no 'prompt' (without one, chosen and rejected must be conversations "
                             "that share their prompt turns)")  # fmt: skip
        chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n and chosen[n - 1]["role"] == "assistant":  # the responses start at the last shared assistant turn
            n -= 1
        if n == 0:
            raise BadExample("missing field", "no 'prompt', and chosen and rejected share no leading turns")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = _messages(record["prompt"], "prompt", "user")
        chosen = _messages(record["chosen"], "chosen", "assistant")
        rejected = _messages(record["rejected"], "rejected", "assistant")
    if not any(m["content"].strip() for m in prompt):
        raise BadExample("missing field", "'prompt' is empty")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        answers = [m for m in side if m["role"] == "assistant"]
        if not answers:
            raise BadExample("empty response", f"{name!r} has no assistant message")
        if any(not m["content"].strip() for m in answers):
            raise BadExample("empty response", f"{name!r} is empty")
    if chosen == rejected:
        raise BadExample("identical responses", "'chosen' and 'rejected' are the same, so there is no preference")
    return prompt, chosen, rejected


# Rendering -----------------------------------------------------------------------------------------------------
def _response_start(mask: Sequence[bool], turns_before: int) -> int:
    """Where the first response turn begins: the start of the (turns_before + 1)-th run of response tokens (the
    prompt's own assistant turns come first)."""
    run = 0
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            if run == turns_before:
                return i
            run += 1
    raise BadExample("empty response", "no response tokens after rendering")


def render_pair(prompt: Messages, chosen: Messages, rejected: Messages, tokenizer: Any,
                template: str) -> tuple[list[int], list[int], list[bool], list[int], list[bool]]:  # fmt: skip
    """Prompt tokens and each response's tokens and scored-token mask, rendered as ``sft`` renders examples: the
    prompt ends with the generation prompt and each response with the format's end-of-turn marker (Alpaca: EOS)."""
    render = render_chat if template == "chat" else render_alpaca
    before = sum(m["role"] == "assistant" for m in prompt)
    sides = []
    for side in (chosen, rejected):
        ids, mask = render([*prompt, *side], tokenizer)
        start = _response_start(mask, before)
        sides.append((ids[:start], ids[start:], mask[start:]))
    (p_ids, c_ids, c_mask), (p_ids2, r_ids, r_mask) = sides
    if p_ids != p_ids2:
        raise BadExample("template", "the prompt renders differently before the chosen and the rejected response")
    if c_ids == r_ids:
        raise BadExample("identical responses", "'chosen' and 'rejected' render to the same tokens")
    return p_ids, c_ids, c_mask, r_ids, r_mask


def load_pairs(path: str | os.PathLike, tokenizer: Any, seq_len: int, template: str = "auto",
               system_prompt: str | None = None, progress: bool = False) -> tuple[list[Pair], DataReport]:  # fmt: skip
    """Parse, render and tokenize a preference file. Unusable records are skipped and reported with their
    location; a ``UserError`` only when no usable pair remains."""
    template = resolve_template(template, tokenizer)
    report = DataReport(str(path))
    pairs: list[Pair] = []
    records: Iterator[Any] = read_records(path)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"tokenizing {Path(path).name}", unit=" pairs", leave=False)
    for record in records:
        report.total += 1
        try:
            prompt, chosen, rejected = record_pair(record.value)
            if system_prompt and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": system_prompt}, *prompt]
            p, c, c_mask, r, r_mask = render_pair(prompt, chosen, rejected, tokenizer, template)
            if len(p) >= seq_len:
                raise BadExample("prompt too long", f"the prompt is {len(p)} tokens, the whole context of {seq_len} "
                                 "(data.seq_len) or more")  # fmt: skip
            longest = len(p) + max(len(c), len(r))
            if longest > seq_len:
                raise BadExample("too long", f"prompt + response is {longest} tokens, more than the context of "
                                 f"{seq_len} (data.seq_len)")  # fmt: skip
        except BadExample as bad:
            report.add(record.where, bad)
            continue
        pairs.append(Pair(record.index, p, c, r, c_mask, r_mask, line=record.line))
    report.kept = len(pairs)
    if not pairs:
        raise UserError(f"no usable pairs in {report.summary(noun='pairs')}" if report.total else f"{path}: no records")
    return pairs, report


# Batches -------------------------------------------------------------------------------------------------------
def collate_pairs(pairs: Sequence[Pair], pad_id: int, device: torch.device | str = "cpu",
                  weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """A micro-batch of B pairs: ``tokens``/``targets`` [2B, T] (the chosen sequences, then the rejected ones;
    targets are the next token where it is a scored response token, else ``IGNORE_INDEX``), ``weights`` [B]
    (0 for padding pairs) and, when precomputed, ``ref_logps`` [2B]."""
    seqs = [(p.prompt + p.chosen, p.chosen_mask, len(p.prompt)) for p in pairs]
    seqs += [(p.prompt + p.rejected, p.rejected_mask, len(p.prompt)) for p in pairs]
    width = max(len(ids) for ids, _, _ in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.long)
        tokens[b, : len(ids)] = t
        scored = torch.tensor([False] * n_prompt + list(mask), dtype=torch.bool)[1:]
        targets[b, : len(ids) - 1] = torch.where(scored, t[1:], IGNORE_INDEX)
    batch = {"tokens": tokens, "targets": targets,
             "weights": torch.tensor(weights if weights is not None else [1.0] * len(pairs))}  # fmt: skip
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float64)  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


class PairLoader:
    """Training batches for ``Trainer``: ``next_step()`` -> this rank's ``grad_accum_steps`` micro-batches of
    ``micro_batch_size`` pairs. Each epoch shuffles the pairs (seeded by seed and epoch); micro-batch m of rank r
    holds pairs ``(m * world + r) * micro ...`` of the step, so N processes see the same global batch as one.
    The position is three integers, so resuming is exact."""

    def __init__(self, pairs: Sequence[Pair], micro_batch_size: int, grad_accum_steps: int = 1, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, pad_id: int = 0,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        if not pairs:
            raise UserError("no training pairs")
        self.pairs = list(pairs)
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum_steps, seed
        self.rank, self.world, self.pad_id, self.device = rank, world_size, pad_id, torch.device(device)
        self.epoch, self.cursor, self.step = 0, 0, 0
        self._order: tuple[int, list[int]] | None = None

    @property
    def pairs_per_step(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> float:
        return len(self.pairs) / self.pairs_per_step

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)).tolist())
        return self._order[1]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        taken: list[int] = []
        while len(taken) < self.pairs_per_step:
            order = self.order(self.epoch)
            need = self.pairs_per_step - len(taken)
            taken += order[self.cursor : self.cursor + need]
            self.cursor += need
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        self.step += 1
        batches = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            group = [self.pairs[i] for i in taken[lo : lo + self.micro]]
            batches.append(collate_pairs(group, self.pad_id, self.device))
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step, "seed": self.seed,
                "pairs_per_step": self.pairs_per_step, "pairs": len(self.pairs)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("pairs_per_step", "seed", "pairs"):
            if key in state and state[key] != mine[key]:
                raise UserError(f"cannot resume the data position: checkpoint has {key}={state[key]}, this run has "
                                f"{mine[key]} (keep the data, global batch and seed)")  # fmt: skip
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])


class PairValidation:
    """Every validation pair once, split over ranks; each rank runs the same number of batches (the last ones
    padded with zero-weight pairs) so that collective forwards stay in step."""

    def __init__(self, pairs: Sequence[Pair], micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0, device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.pairs = list(pairs)
        per_batch = micro_batch_size * world_size
        self.n_batches = -(-len(self.pairs) // per_batch)
        self.micro, self.rank, self.world, self.pad_id, self.device = micro_batch_size, rank, world_size, pad_id, device

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.n_batches):
            lo = (b * self.world + self.rank) * self.micro
            idx = list(range(lo, lo + self.micro))
            weights = [1.0 if i < len(self.pairs) else 0.0 for i in idx]
            yield collate_pairs([self.pairs[min(i, len(self.pairs) - 1)] for i in idx], self.pad_id, self.device,
                                weights)  # fmt: skip
