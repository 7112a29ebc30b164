"""Supervised fine-tuning on instruction data, run by the pretraining ``Trainer``.

Data: Alpaca records (``instruction``, optional ``input``, ``output``) or chat records (``messages``:
[{role, content}, ...]) in any file ``records.read_records`` reads (JSON array, JSONL, Parquet, datasets).
Each example is rendered with the model's chat format or the Alpaca prompt and tokenized; only response tokens
(the assistant turns, with their end-of-turn token) are targets, everything else is ``IGNORE_INDEX``. Bad
records (missing fields, empty responses, examples longer than the context) are skipped and reported with
their location; only a file with nothing valid left is an error.

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
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import UserError
from .loss import IGNORE_INDEX
from .recipe import Recipe, Trainer, _set_dotted
from .records import BadExample, DataReport, read_records, split_by_index

TEMPLATES = ("auto", "chat", "alpaca")
METHODS = ("full", "lora", "qlora")
OBJECTIVES = ("sft", "dpo")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")  # fmt: skip
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")  # fmt: skip


# Records as conversations ---------------------------------------------------------------------------------
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
    index: int  # the record's position in its file: its identity for the train/validation split
    tokens: list[int]
    mask: list[bool]  # True: the token is part of a response (predicted, so counted by the loss)
    line: int = 0  # where the record starts, for messages

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


def load_examples(path: str | os.PathLike, tokenizer: Any, seq_len: int, template: str = "auto",
                  system_prompt: str | None = None,
                  progress: bool = False) -> tuple[list[Example], DataReport]:  # fmt: skip
    """Parse, render and tokenize a data file. Records that cannot be used are skipped and reported (with their
    lines); a ``UserError`` only when no valid example remains."""
    template = resolve_template(template, tokenizer)
    render = render_chat if template == "chat" else render_alpaca
    report = DataReport(str(path))
    examples: list[Example] = []
    records = read_records(path)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"tokenizing {Path(path).name}", unit=" examples", leave=False)
    for record in records:
        report.total += 1
        try:
            messages = record_messages(record.value, template)
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            tokens, mask = render(messages, tokenizer)
            if len(tokens) > seq_len:
                raise BadExample("too long", f"{len(tokens)} tokens, more than the context of {seq_len} "
                                 "(data.seq_len)")  # fmt: skip
            if not any(mask[1:]):
                raise BadExample("empty response", "no response tokens after rendering")
        except BadExample as bad:
            report.add(record.where, bad)
            continue
        examples.append(Example(record.index, tokens, mask, record.line))
    report.kept = len(examples)
    if not examples:
        raise UserError(f"no usable examples in {report.summary()}" if report.total else f"{path}: no records")
    return examples, report


def split_examples(examples: Sequence[Example], val_fraction: float,
                   seed: int = 0) -> tuple[list[Example], list[Example]]:  # fmt: skip
    """(train, validation) by each example's index in its file (see ``records.split_by_index``)."""
    return split_by_index(examples, val_fraction, seed)


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
        self.examples = [*examples, Example(-1, [pad_id], [False])]  # the last one pads
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
    objective: str = "sft"  # sft (instruction data) | dpo (preference pairs: train/dpo.py)
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo | simpo (reference-free)
    dpo_beta: float | None = None  # default: 0.1 for sigmoid and ipo, 2.0 for simpo
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    dpo_reference: str = "auto"  # auto (LoRA/QLoRA: adapters off; full: precompute) | precompute | adapter-off
    rpo_alpha: float | None = None  # RPO: + alpha x the chosen responses' mean NLL (TRL's rpo_alpha); None/0: off


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

    # Where the run's length (train.steps or finetune.epochs) came from, for the run's first line; set by load().
    length_source: ClassVar[str | None] = None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneRecipe:
        """Fine-tuning defaults, then the YAML recipe, then ``{"optim.lr": "1e-4", ...}`` overrides.

        The run's length is ``train.steps`` or ``finetune.epochs``, whichever the later layer gives (the command
        line over the recipe file over the defaults): a step count the user typed clears the recipe's epochs. One
        layer giving both is an error naming both."""
        import yaml

        data = json.loads(json.dumps(FINETUNE_DEFAULTS))
        where = "recipe"
        loaded: dict[str, Any] = {}
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
        parsed = {key: yaml.safe_load(raw) if isinstance(raw, str) else raw for key, raw in (overrides or {}).items()}
        for key, value in parsed.items():
            _set_dotted(data, key, value)

        def given(section: str, name: str) -> Any:
            values = loaded.get(section)
            return values.get(name) if isinstance(values, dict) else None

        layers = [("the command line", parsed.get("train.steps"), parsed.get("finetune.epochs"))]
        if path is not None:
            layers.append((f"the recipe {path}", given("train", "steps"), given("finetune", "epochs")))
        source = f"train.steps {data['train']['steps']} (the default; set --steps or --epochs)"
        for name, steps, epochs in layers:
            if steps is not None and epochs is not None:
                raise UserError(f"{name} sets both train.steps ({steps}) and finetune.epochs ({epochs}); they are "
                                "two lengths for one run: give one of them")  # fmt: skip
            if steps is not None:
                source = f"train.steps {steps} from {name}"
                replaced = (data.get("finetune") or {}).get("epochs")
                if replaced is not None:
                    source += f", in place of finetune.epochs {replaced} of {layers[-1][0]}"
                    _set_dotted(data, "finetune.epochs", None)
                break
            if epochs is not None:
                source = f"finetune.epochs {epochs} from {name}"
                break
        recipe = cls.from_dict(data, where)
        if recipe.finetune.epochs is None and source.startswith("finetune.epochs"):  # --set finetune.epochs=null
            source = f"train.steps {recipe.train.steps}"
        recipe.length_source = source
        return recipe

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
        if f.objective not in OBJECTIVES:
            problems.append(f"finetune.objective {f.objective!r} must be one of {', '.join(OBJECTIVES)}")
        if f.objective == "dpo":
            from .dpo import LOSSES, REFERENCES

            if f.dpo_loss not in LOSSES:
                problems.append(f"finetune.dpo_loss {f.dpo_loss!r} must be one of {', '.join(LOSSES)}")
            if f.dpo_reference not in REFERENCES:
                problems.append(f"finetune.dpo_reference {f.dpo_reference!r} must be one of {', '.join(REFERENCES)}")
            if f.dpo_reference == "adapter-off" and f.method == "full":
                problems.append("finetune.dpo_reference adapter-off needs LoRA or QLoRA (full tuning has no adapter to "
                                "switch off): use auto or precompute")  # fmt: skip
            if f.dpo_beta is not None and not f.dpo_beta > 0:
                problems.append(f"finetune.dpo_beta must be positive, got {f.dpo_beta}")
            if f.rpo_alpha is not None and not (math.isfinite(f.rpo_alpha) and f.rpo_alpha >= 0):
                problems.append(f"finetune.rpo_alpha (the weight of the chosen responses' NLL) must be a number >= 0, "
                                f"got {f.rpo_alpha}")  # fmt: skip
            split = " and ".join(f"parallel.{k} {v}" for k, v in (("tp", self.parallel.tp), ("pp", self.parallel.pp))
                                 if v > 1)  # fmt: skip
            if split:  # pipelines and tensor parallelism compute the next-token loss only (train/parallel.py)
                problems.append(f"finetune.objective dpo runs under data parallelism only (train.parallel ddp or "
                                f"fsdp), not with {split}: set parallel.tp and parallel.pp to 1")  # fmt: skip
        elif f.rpo_alpha:
            problems.append(f"finetune.rpo_alpha {f.rpo_alpha} applies to preference tuning only (finetune.objective "
                            f"dpo, --method dpo); the objective is {f.objective!r}")  # fmt: skip
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
            if f.method == "qlora" and self.parallel.tp > 1:  # train/tensor_parallel.py splits float layers only
                problems.append(f"finetune.method qlora does not run with parallel.tp {self.parallel.tp} (a "
                                "quantized base is not split): use --method lora, or parallel.tp 1 (data "
                                "parallelism)")  # fmt: skip
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
        # A's initial values come from train.seed: the same on every rank (FSDP2 does not broadcast them) and in
        # every run (torch seeds each process differently)
        torch.manual_seed(recipe.train.seed)
        apply_lora(model, recipe.lora_config())
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    counts = {"trainable": trainable, "total": sum(p.numel() for p in unique)}
    if f.method != "full":
        counts["expected_lora"] = expected_lora_parameters(model)
    model.train()
    return counts


def plan_steps(recipe: FinetuneRecipe, steps_per_epoch: float) -> str:
    """Set ``train.steps`` from ``finetune.epochs`` when the run is measured in epochs; return the run's first
    line: how many steps it takes, and why."""
    f, t = recipe.finetune, recipe.train
    source = recipe.length_source or (f"finetune.epochs {f.epochs:g}" if f.epochs is not None else "train.steps")
    if f.epochs is not None:
        t.steps = max(1, math.ceil(f.epochs * steps_per_epoch))
        how = f"{f.epochs:g} epochs x {steps_per_epoch:.1f} steps per epoch"
    else:
        how = f"{t.steps / max(steps_per_epoch, 1e-9):.2f} epochs of {steps_per_epoch:.1f} steps"
    return f"{t.steps} optimizer steps ({how}): {source}"


def load_finetune_model(recipe: FinetuneRecipe, llm: Any = None) -> Any:
    """The ``LLM`` to fine-tune (``llm`` or ``model.from_checkpoint`` with float32 weights), checked against the
    recipe: it has a tokenizer to render the data with, and ``data.seq_len`` fits its context."""
    if not recipe.finetune.data:
        raise UserError("finetune.data (--data) names the training file")
    if llm is None:
        from ..llm import load

        llm = load(recipe.model.from_checkpoint, device="cpu", dtype=torch.float32)
    if llm.tokenizer is None:
        raise UserError(f"{recipe.model.from_checkpoint}: the model has no tokenizer to render the data with")
    if recipe.data.seq_len > llm.config.max_seq_len:
        raise UserError(f"data.seq_len {recipe.data.seq_len} exceeds the model's context of {llm.config.max_seq_len}")
    return llm


def start_process(recipe: FinetuneRecipe, llm: Any = None) -> tuple[int, int, int, torch.device, Any, Any]:
    """This process's part in a fine-tuning run (every objective): its rank, its data-parallel rank and the number of
    data-parallel ranks (tensor- and pipeline-parallel peers read the same batches), its device, the model to tune
    and ``say(msg)``, which prints on rank 0 when the recipe's console logging is on."""
    from ..distributed import resolve_device

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dims = recipe.parallel_dims(world)
    device = resolve_device(recipe.train.device, int(os.environ.get("LOCAL_RANK", str(rank))))
    llm = load_finetune_model(recipe, llm)

    def say(msg: str) -> None:
        if rank == 0 and recipe.logging.console:
            print(msg, flush=True)

    return rank, dims.data_rank(rank), dims.dp, device, llm, say


def finetune(recipe: FinetuneRecipe, *, llm: Any = None, callbacks: Sequence[Any] = (),
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``recipe.model.from_checkpoint`` on ``recipe.finetune.data``; returns the run's summary.
    ``finetune.objective: dpo`` trains on preference pairs instead (``dpo.finetune_dpo``).

    ``llm``: an already loaded ``LLM`` to fine-tune in place (its model is modified), instead of loading one.
    """
    if recipe.finetune.objective == "dpo":
        from .dpo import finetune_dpo

        return finetune_dpo(recipe, llm=llm, callbacks=callbacks, progress=progress)
    f, d, t = recipe.finetune, recipe.data, recipe.train
    rank, data_rank, data_world, device, llm, say = start_process(recipe, llm)
    tokenizer = llm.tokenizer

    examples, report = load_examples(f.data, tokenizer, d.seq_len, f.template, f.system_prompt,
                                     progress=progress and rank == 0)  # fmt: skip
    if f.val_data:
        train_ex = examples
        val_ex, val_report = load_examples(f.val_data, tokenizer, d.seq_len, f.template, f.system_prompt)
    else:
        train_ex, val_ex = split_examples(examples, f.val_fraction, t.seed)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = SFTLoader(train_ex, d.seq_len, d.micro_batch_size, d.grad_accum_steps, rank=data_rank,
                       world_size=data_world, seed=t.seed, pack=f.pack, pad_id=pad_id, device=device)  # fmt: skip
    say(plan_steps(recipe, loader.steps_per_epoch))
    if report.n_skipped and rank == 0:
        warnings.warn(report.summary(), stacklevel=2)  # skipped lines are reported, the run goes on
    else:
        say(report.summary())
    if f.val_data:
        say(val_report.summary())
    adapts_head = f.method != "full" and "output" in recipe.lora_config().targets
    if adapts_head and f.lora_dropout > 0:  # the fused loss reads the merged head weight, without dropout
        recipe.train.fused_loss = False
    val = SFTValidation(val_ex, d.seq_len, d.micro_batch_size, rank=data_rank, world_size=data_world, pack=f.pack,
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
