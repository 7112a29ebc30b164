"""Supervised fine-tuning on instruction data, run by the pretraining ``Trainer``.

Data: Alpaca records (``instruction``, optional ``input``, ``output``) as a JSON array or JSONL, or chat
records (``messages``: [{role, content}, ...]) as JSONL. Each example is rendered with the model's chat
format or the Alpaca prompt and tokenized; only response tokens (the assistant turns, with their end-of-turn
token) are targets, everything else is ``IGNORE_INDEX``. Bad records (missing fields, empty responses,
examples longer than the context) are skipped and reported by line number; only a file with nothing valid
left is an error.

Batches: examples are packed into rows of at most ``seq_len`` tokens (first-fit over a few open rows, in
a per-epoch shuffled order) with a block-diagonal causal mask, so packed examples never see each other.
Rotary embeddings depend only on relative positions, so an example gives the same result wherever it sits
in its row. ``SFTLoader`` serves the same plan on every rank (each rank its rows) and its position is three
integers, so resuming is exact.

``finetune(recipe)`` puts it together: load the model, apply the method (full, LoRA or QLoRA), and train
with ``recipe.Trainer`` (the same optimizer, schedule, DCP checkpoints/resume, logging and DDP/FSDP2 as
pretraining). LoRA runs end by writing the adapter alone (``<out_dir>/adapter``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .loss import IGNORE_INDEX
from .recipe import Recipe, Trainer, _set_dotted

TEMPLATES = ("auto", "chat", "alpaca")
METHODS = ("full", "lora", "qlora")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")  # fmt: skip
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")  # fmt: skip


class BadExample(ValueError):  # noqa: N818 - a record, not a program error
    """One record cannot be used; ``reason`` groups the report (``missing field``, ``too long`` ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# Reading records ---------------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or BadExample) for each record of a JSON array or JSONL file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        yield from _read_json_array(path, text, start)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, BadExample("invalid JSON", exc.msg)


def _read_json_array(path: Path, text: str, pos: int) -> Iterator[tuple[int, Any]]:
    """Each element of a top-level JSON array with the line it starts on (``json.load`` would lose that)."""
    decoder = json.JSONDecoder()
    line, last = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, i)
        last = i
        return line

    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}: the JSON array is not closed (line {line_at(pos)})")
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:  # the rest of the array cannot be parsed reliably
            raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        yield line_at(pos), obj
        pos = end


def record_messages(record: Any, template: str) -> list[dict[str, str]]:
    """A record as a conversation (Alpaca: one user turn and the response); BadExample when unusable."""
    if isinstance(record, BadExample):
        raise record
    if not isinstance(record, dict):
        raise BadExample("not an object", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadExample("bad messages", "'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadExample("bad messages", f"messages[{i}] needs a 'role' string")
            if not isinstance(m.get("content"), str):
                raise BadExample("bad messages", f"messages[{i}] needs a 'content' string")
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise BadExample("empty response", "no assistant message")
        if any(not m["content"].strip() for m in answers):
            raise BadExample("empty response", "an assistant message is empty")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for key in ("instruction", "output"):
        if key not in record:
            raise BadExample("missing field", f"no {key!r} (Alpaca records need instruction and output; chat "
                             "records need messages)")  # fmt: skip
    for key in ("instruction", "input", "output"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise BadExample("bad field", f"{key!r} must be a string, got {type(record[key]).__name__}")
    if not record["output"].strip():
        raise BadExample("empty response", "'output' is empty")
    if not record["instruction"].strip():
        raise BadExample("missing field", "'instruction' is empty")
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if template == "alpaca":  # keep the fields: the Alpaca prompt has a separate Input section
        messages[0]["_alpaca"] = json.dumps([record["instruction"], record.get("input") or ""])
    return messages


# Rendering ---------------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, allow_special=True) if special else tokenizer.encode(text))


def resolve_template(template: str, tokenizer: Any) -> str:
    if template not in TEMPLATES:
        raise UserError(f"template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        has_chat = bool(getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "chat_format", None))
        return "chat" if has_chat else "alpaca"
    return template


def render_alpaca(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """The Alpaca prompt (BOS when the tokenizer adds one) and the response followed by EOS."""
    users = [m for m in messages if m["role"] == "user"]
    answers = [m for m in messages if m["role"] == "assistant"]
    if len(users) != 1 or len(answers) != 1 or messages[-1]["role"] != "assistant":
        raise BadExample("not single-turn", "the Alpaca prompt takes one user turn and one response; use the "
                         "chat template for conversations")  # fmt: skip
    if "_alpaca" in users[0]:
        instruction, inp = json.loads(users[0]["_alpaca"])
    else:
        instruction, inp = users[0]["content"], ""
    prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=instruction, input=inp)
    add_bos = getattr(tokenizer, "add_bos_default", True) and getattr(tokenizer, "bos_id", None) is not None
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which the Alpaca format ends each response with")
    ids = ([tokenizer.bos_id] if add_bos else []) + _encode(tokenizer, prompt, False)
    response = [*_encode(tokenizer, answers[0]["content"], False), eos]
    return ids + response, [False] * len(ids) + [True] * len(response)


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Tokens of the conversation in the model's chat format; True marks assistant-turn tokens (the content
    and the end-of-turn marker the format writes after it).

    Each assistant turn i sits between the prompt rendered for it (``messages[:i]`` + the generation prompt)
    and the conversation through it. When the tokenizer's own chat encoding is prefix-consistent the ids are
    exactly what inference feeds the model; otherwise the rendered text is split there and each piece encoded.
    """

    def enc(msgs: list[dict[str, str]], gen: bool) -> list[int]:
        if hasattr(tokenizer, "encode_chat"):
            return list(tokenizer.encode_chat(msgs, add_generation_prompt=gen))
        return _encode(tokenizer, tokenizer.format_chat(msgs, add_generation_prompt=gen), True)

    def text(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.format_chat(msgs, add_generation_prompt=gen)

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids: list[int] = []
    mask: list[bool] = []
    try:
        prev = []
        for i in turns:
            prompt, full = enc(messages[:i], True), enc(messages[: i + 1], False)
            if prompt[: len(prev)] != prev or full[: len(prompt)] != prompt:
                raise _NotPrefix
            mask += [False] * (len(prompt) - len(prev)) + [True] * (len(full) - len(prompt))
            ids, prev = full, full
        return ids, mask
    except _NotPrefix:
        pass
    ids, mask, prev_text = [], [], ""
    for i in turns:
        prompt, full = text(messages[:i], True), text(messages[: i + 1], False)
        if not (prompt.startswith(prev_text) and full.startswith(prompt)):
            raise BadExample("template", "the chat template does not render this conversation's turns as "
                             "prefixes of each other")  # fmt: skip
        p_ids, r_ids = _encode(tokenizer, prompt[len(prev_text) :], True), _encode(tokenizer, full[len(prompt) :], True)
        ids += p_ids + r_ids
        mask += [False] * len(p_ids) + [True] * len(r_ids)
        prev_text = full
    return ids, mask


class _NotPrefix(Exception):  # noqa: N818 - internal control flow
    pass


@dataclass
class Example:
    line: int
    tokens: list[int]
    mask: list[bool]  # True: the token is part of a response (predicted, so counted by the loss)

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


@dataclass
class DataReport:
    """What came out of a data file: kept examples and skipped lines grouped by reason."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def add(self, line: int, bad: BadExample) -> None:
        self.skipped.setdefault(bad.reason, []).append((line, bad.detail))

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, max_lines: int = 5) -> str:
        head = f"{self.path}: {self.kept} of {self.total} examples kept"
        if not self.skipped:
            return head
        parts = []
        for reason, items in sorted(self.skipped.items(), key=lambda kv: -len(kv[1])):
            shown = "; ".join(f"line {n}: {d}" for n, d in items[:max_lines])
            more = f"; ... {len(items) - max_lines} more" if len(items) > max_lines else ""
            parts.append(f"  {reason} ({len(items)}): {shown}{more}")
        return f"{head}, {self.n_skipped} skipped:\n" + "\n".join(parts)


def load_examples(path: str | os.PathLike, tokenizer: Any, seq_len: int, template: str = "auto",
                  system_prompt: str | None = None,
                  progress: bool = False) -> tuple[list[Example], DataReport]:  # fmt: skip
    """Parse, render and tokenize a data file. Records that cannot be used are skipped and reported (with line
    numbers); a ``UserError`` only when no valid example remains."""
    template = resolve_template(template, tokenizer)
    render = render_chat if template == "chat" else render_alpaca
    report = DataReport(str(path))
    examples: list[Example] = []
    records = read_records(path)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"tokenizing {Path(path).name}", unit=" examples", leave=False)
    for line, record in records:
        report.total += 1
        try:
            messages = record_messages(record, template)
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            tokens, mask = render(messages, tokenizer)
            if len(tokens) > seq_len:
                raise BadExample("too long", f"{len(tokens)} tokens, more than the context of {seq_len} "
                                 "(data.seq_len)")  # fmt: skip
            if not any(mask[1:]):
                raise BadExample("empty response", "no response tokens after rendering")
        except BadExample as bad:
            report.add(line, bad)
            continue
        examples.append(Example(line, tokens, mask))
    report.kept = len(examples)
    if not examples:
        raise UserError(f"no usable examples in {report.summary()}" if report.total else f"{path}: no records")
    return examples, report


def split_examples(
    examples: Sequence[Example], val_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, validation): each example goes to validation by a hash of (seed, line), so the split is the same
    on every rank and run; at least one example stays on each side when there are two or more."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"finetune.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return list(examples), []

    def u(ex: Example) -> float:
        digest = hashlib.blake2b(f"{seed}:{ex.line}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    scored = sorted(examples, key=u)
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    val_lines = {ex.line for ex in scored[:n_val]}
    return [e for e in examples if e.line not in val_lines], [e for e in examples if e.line in val_lines]


# Packing and batches -----------------------------------------------------------------------------------------
def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, pack: bool = True,
              lookahead: int = 16) -> list[list[int]]:  # fmt: skip
    """Rows of example indices, each at most ``seq_len`` tokens: first fit among the last ``lookahead`` open
    rows, taking examples in ``order``. Without packing, one example per row."""
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []
    for i in order:
        n = lengths[i]
        for r in open_rows:
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
            open_rows.append(len(rows) - 1)
            if len(open_rows) > lookahead:
                open_rows.pop(0)
        open_rows = [r for r in open_rows if room[r] > 0]
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:  # fmt: skip
    """A micro-batch: ``tokens``/``targets`` [B, T] (T = the longest row), right-padded with ignored targets;
    ``attn_mask`` [B, 1, T, T] when a row holds several examples (causal within each example only)."""
    width = max(1, max((sum(len(examples[i].tokens) for i in row) for row in rows), default=1))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row):
            ex = examples[i]
            n = len(ex.tokens)
            t = torch.tensor(ex.tokens, dtype=torch.long)
            keep = torch.tensor(ex.mask[1:], dtype=torch.bool)
            tokens[b, pos : pos + n] = t
            targets[b, pos : pos + n - 1] = torch.where(keep, t[1:], IGNORE_INDEX)
            segments[b, pos : pos + n] = seg
            pos += n
    batch = {"tokens": tokens, "targets": targets}
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        batch["attn_mask"] = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    return {k: v.to(device) for k, v in batch.items()}


class SFTLoader:
    """Training batches for ``Trainer``: ``next_step()`` -> this rank's ``grad_accum_steps`` micro-batches.

    Each epoch shuffles the examples (seeded by seed and epoch) and packs them into rows; a step takes the next
    ``micro * accum * world`` rows (continuing into the next epoch at the end of one); micro-batch m of rank r
    holds rows ``(m * world + r) * micro ...``, so N processes see the same global batch as one.
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 *, rank: int = 0, world_size: int = 1, seed: int = 0, pack: bool = True, pad_id: int = 0,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        if not examples:
            raise UserError("no training examples")
        self.examples = list(examples)
        self.seq_len, self.micro, self.accum = seq_len, micro_batch_size, grad_accum_steps
        self.rank, self.world, self.seed, self.pack = rank, world_size, seed, pack
        self.pad_id, self.device = pad_id, torch.device(device)
        self.lengths = [len(e.tokens) for e in self.examples]
        self.epoch, self.cursor, self.step = 0, 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum * self.world

    def rows(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
            self._plan = (epoch, pack_rows(self.lengths, order, self.seq_len, self.pack))
        return self._plan[1]

    @property
    def steps_per_epoch(self) -> float:
        return len(self.rows(0)) / self.rows_per_step

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        taken: list[list[int]] = []
        while len(taken) < self.rows_per_step:
            rows = self.rows(self.epoch)
            need = self.rows_per_step - len(taken)
            taken += rows[self.cursor : self.cursor + need]
            self.cursor += need
            if self.cursor >= len(rows):
                self.epoch, self.cursor = self.epoch + 1, 0
        self.step += 1
        batches = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            batches.append(collate(self.examples, taken[lo : lo + self.micro], self.pad_id, self.device))
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step, "seed": self.seed,
                "rows_per_step": self.rows_per_step, "seq_len": self.seq_len, "examples": len(self.examples),
                "pack": self.pack}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "rows_per_step", "seed", "examples", "pack"):
            if key in state and state[key] != mine[key]:
                raise UserError(f"cannot resume the data position: checkpoint has {key}={state[key]}, this run "
                                f"has {mine[key]} (keep the data, global batch, seq_len and seed)")  # fmt: skip
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])


class SFTValidation:
    """Every validation example once, packed, split over ranks; each rank runs the same number of batches
    (padded with empty rows) so that collective forwards under FSDP stay in step."""

    def __init__(self, examples: Sequence[Example], seq_len: int, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, pack: bool = True, pad_id: int = 0,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.examples = [*examples, Example(0, [pad_id], [False])]  # the last one pads
        empty = len(self.examples) - 1
        rows = pack_rows([len(e.tokens) for e in self.examples[:-1]], range(empty), seq_len, pack)
        per_batch = micro_batch_size * world_size
        rows += [[empty]] * (-len(rows) % per_batch)
        self.rows, self.micro, self.rank, self.world = rows, micro_batch_size, rank, world_size
        self.pad_id, self.device = pad_id, torch.device(device)

    def __len__(self) -> int:
        return len(self.rows) // (self.micro * self.world)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(len(self)):
            lo = (b * self.world + self.rank) * self.micro
            yield collate(self.examples, self.rows[lo : lo + self.micro], self.pad_id, self.device)


# The recipe and the run --------------------------------------------------------------------------------------
@dataclass
class FinetuneSection:
    data: str = ""  # Alpaca JSON/JSONL or chat JSONL
    val_data: str | None = None  # a separate validation file (default: split val_fraction off data)
    val_fraction: float = 0.05
    template: str = "auto"  # auto (the model's chat format when it has one) | chat | alpaca
    system_prompt: str | None = None  # prepended to conversations that have none (chat template)
    pack: bool = True
    epochs: float | None = None  # sets train.steps from the data size when given
    method: str = "lora"  # full | lora | qlora
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(("wq", "wk", "wv", "wo", "w1", "w2", "w3"))  # names, or all/attention/mlp
    quant: str = "nf4"  # QLoRA base: nf4 | int4 | int4-g32/64/128
    adapter_layout: str = "peft"  # peft (Hugging Face PEFT names) | llamaforge


# Fine-tuning defaults that differ from pretraining's (the recipe or the command line can change each).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "model": {"preset": None},
    "data": {"seq_len": 512, "micro_batch_size": 4, "val_batches": 0},
    "optim": {"lr": 2e-4, "warmup_steps": 10, "weight_decay": 0.0, "min_lr_ratio": 0.0},
    "train": {
        "steps": 100,
        "out_dir": "runs/finetune",
        "eval_interval": 50,
        "ckpt_interval": 100,
        "log_interval": 5,
    },
}


@dataclass
class FinetuneRecipe(Recipe):
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneRecipe:
        """Fine-tuning defaults, then the YAML recipe, then ``{"optim.lr": "1e-4", ...}`` overrides."""
        import yaml

        data = json.loads(json.dumps(FINETUNE_DEFAULTS))
        where = "recipe"
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"no such recipe: {path}")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise UserError(f"{path}: a recipe is a mapping of sections")
            for section, values in loaded.items():
                if isinstance(values, dict) and isinstance(data.get(section), dict):
                    data[section].update(values)
                else:
                    data[section] = values
            where = str(path)
        for key, raw in (overrides or {}).items():
            _set_dotted(data, key, yaml.safe_load(raw) if isinstance(raw, str) else raw)
        return cls.from_dict(data, where)

    def validate(self, where: str = "recipe") -> None:
        f = self.finetune
        if self.model.from_checkpoint is None:
            raise UserError(f"{where}: model.from_checkpoint (--model) names the model to fine-tune")
        super().validate(where)
        problems = []
        if f.method not in METHODS:
            problems.append(f"finetune.method {f.method!r} must be one of {', '.join(METHODS)}")
        if f.template not in TEMPLATES:
            problems.append(f"finetune.template {f.template!r} must be one of {', '.join(TEMPLATES)}")
        if f.adapter_layout not in ("peft", "llamaforge"):
            problems.append(f"finetune.adapter_layout {f.adapter_layout!r} must be peft or llamaforge")
        if f.epochs is not None and not f.epochs > 0:
            problems.append(f"finetune.epochs must be positive, got {f.epochs}")
        if f.method != "full":
            from .lora import QUANT_SCHEMES

            try:
                self.lora_config()
            except ValueError as exc:
                problems.append(f"finetune: {exc}")
            if f.method == "qlora" and f.quant not in QUANT_SCHEMES:
                problems.append(f"finetune.quant {f.quant!r} must be one of {', '.join(QUANT_SCHEMES)}")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))

    def lora_config(self):
        from .lora import LoraConfig

        f = self.finetune
        return LoraConfig(r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout, targets=f.lora_targets)


class FinetuneTrainer(Trainer):
    """The pretraining Trainer; at the end a LoRA run writes its adapter (a full run: the HF directory)."""

    def __init__(self, recipe: FinetuneRecipe, *, base_model: str = "", **kwargs: Any) -> None:
        super().__init__(recipe, **kwargs)
        self.base_model = base_model

    def _export(self, module, out_dir: Path, info, config, logger) -> Path | None:
        from .checkpointing import full_model_state
        from .lora import save_adapter
        from .parallel import barrier

        r: FinetuneRecipe = self.recipe  # type: ignore[assignment]
        if r.finetune.method == "full":
            return super()._export(module, out_dir, info, config, logger)
        target = Path(r.train.export_dir) if r.train.export_dir else out_dir / "adapter"
        state = full_model_state(module, self.layout)  # collective under FSDP and PP
        if info.is_main:
            lora_state = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
            save_adapter(lora_state, target, r.lora_config(), config, base_model=self.base_model,
                         layout=r.finetune.adapter_layout)  # fmt: skip
            logger.print(f"wrote {target}")
        barrier()
        return target if info.is_main else None


def prepare_model(model: torch.nn.Module, recipe: FinetuneRecipe) -> dict[str, int]:
    """Apply the recipe's method in place (full: everything trains; lora; qlora: 4-bit frozen base + LoRA).
    Returns parameter counts."""
    from .lora import apply_lora, expected_lora_parameters, quantize_base

    f = recipe.finetune
    if f.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if f.method == "qlora":
            quantize_base(model, f.quant)
        apply_lora(model, recipe.lora_config())
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    counts = {"trainable": trainable, "total": sum(p.numel() for p in unique)}
    if f.method != "full":
        counts["expected_lora"] = expected_lora_parameters(model)
    model.train()
    return counts


def finetune(recipe: FinetuneRecipe, *, llm: Any = None, callbacks: Sequence[Any] = (),
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``recipe.model.from_checkpoint`` on ``recipe.finetune.data``; returns the run's summary.

    ``llm``: an already loaded ``LLM`` to fine-tune in place (its model is modified), instead of loading one.
    """
    from ..distributed import resolve_device

    f, d, t = recipe.finetune, recipe.data, recipe.train
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(t.device, int(os.environ.get("LOCAL_RANK", str(rank))))
    if llm is None:
        from ..llm import load

        llm = load(recipe.model.from_checkpoint, device="cpu", dtype=torch.float32)
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise UserError(f"{recipe.model.from_checkpoint}: the model has no tokenizer to render the data with")
    if not f.data:
        raise UserError("finetune.data (--data) names the training file")
    if d.seq_len > llm.config.max_seq_len:
        raise UserError(f"data.seq_len {d.seq_len} exceeds the model's context of {llm.config.max_seq_len}")

    def say(msg: str) -> None:
        if rank == 0 and recipe.logging.console:
            print(msg, flush=True)

    examples, report = load_examples(f.data, tokenizer, d.seq_len, f.template, f.system_prompt,
                                     progress=progress and rank == 0)  # fmt: skip
    if report.n_skipped and rank == 0:
        warnings.warn(report.summary(), stacklevel=2)  # skipped lines are reported, the run goes on
    else:
        say(report.summary())
    if f.val_data:
        train_ex = examples
        val_ex, val_report = load_examples(f.val_data, tokenizer, d.seq_len, f.template, f.system_prompt)
        say(val_report.summary())
    else:
        train_ex, val_ex = split_examples(examples, f.val_fraction, t.seed)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = SFTLoader(train_ex, d.seq_len, d.micro_batch_size, d.grad_accum_steps, rank=rank, world_size=world,
                       seed=t.seed, pack=f.pack, pad_id=pad_id, device=device)  # fmt: skip
    if f.epochs is not None:
        recipe.train.steps = max(1, math.ceil(f.epochs * loader.steps_per_epoch))
    adapts_head = f.method != "full" and "output" in recipe.lora_config().targets
    if adapts_head and f.lora_dropout > 0:  # the fused loss reads the merged head weight, without dropout
        recipe.train.fused_loss = False
    val = SFTValidation(val_ex, d.seq_len, d.micro_batch_size, rank=rank, world_size=world, pack=f.pack,
                        pad_id=pad_id, device=device) if val_ex else None  # fmt: skip
    counts = prepare_model(llm.model, recipe)
    n_tokens = sum(len(e.tokens) for e in train_ex)
    n_targets = sum(e.n_targets for e in train_ex)
    say(f"{len(train_ex)} training examples ({n_tokens:,} tokens, {n_targets:,} response targets), "
        f"{len(val_ex)} validation; {loader.steps_per_epoch:.1f} steps per epoch; method {f.method}: "
        f"{counts['trainable']:,} of {counts['total']:,} parameters train")  # fmt: skip
    trainer = FinetuneTrainer(recipe, model=llm.model, train_data=loader, val_data=val, tokenizer=tokenizer,
                              callbacks=callbacks, base_model=str(recipe.model.from_checkpoint))  # fmt: skip
    summary = trainer.fit()
    summary.update(method=f.method, examples=len(train_ex), val_examples=len(val_ex), skipped_examples=report.n_skipped,
                   trainable_params=counts["trainable"],
                   epochs=loader.step / max(loader.steps_per_epoch, 1e-9))  # fmt: skip
    summary["history"] = trainer.history
    summary["val_history"] = trainer.val_history
    return summary


def recipe_fields() -> list[tuple[str, Any, Any]]:
    """(dotted name, type, default) of every fine-tuning recipe field, defaults as ``finetune`` applies them."""
    import typing

    out = []
    for section in dataclasses.fields(FinetuneRecipe):
        cls = typing.get_type_hints(FinetuneRecipe)[section.name]
        hints = typing.get_type_hints(cls)
        default = cls(**FINETUNE_DEFAULTS.get(section.name, {}))
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", hints[f.name], getattr(default, f.name)))
    return out


__all__ = ["DataReport", "Example", "FinetuneRecipe", "FinetuneSection", "FinetuneTrainer", "SFTLoader",
           "SFTValidation", "collate", "finetune", "load_examples", "pack_rows", "read_records", "render_alpaca",
           "render_chat", "split_examples"]  # fmt: skip
