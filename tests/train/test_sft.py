"""Instruction data: parsing with line numbers, rendering with response-only masks, packing, loader, split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from llamaforge.errors import UserError
from llamaforge.train.loss import IGNORE_INDEX, CausalLMLoss
from llamaforge.train.sft import (
    ALPACA_PROMPT,
    Example,
    FinetuneRecipe,
    SFTLoader,
    SFTValidation,
    collate,
    load_examples,
    pack_rows,
    read_records,
    render_alpaca,
    render_chat,
    split_examples,
)


class ChatByteTokenizer:
    """Bytes plus BOS/EOS and two chat markers: a ChatML-like format without any trained vocabulary."""

    bos_id, eos_id, vocab_size, add_bos_default = 256, 257, 260, True
    chat_template = "chatml-like"
    special: ClassVar[dict[str, int]] = {"<|im_start|>": 258, "<|im_end|>": 259}

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        ids = []
        rest = text
        while rest:
            hit = min(((rest.find(s), s) for s in self.special if allow_special and s in rest), default=None)
            if hit is None:
                ids += list(rest.encode())
                break
            ids += [*rest[: hit[0]].encode(), self.special[hit[1]]]
            rest = rest[hit[0] + len(hit[1]) :]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        inv = {v: k for k, v in self.special.items()}
        return "".join(inv.get(i, chr(i) if i < 256 else "") for i in ids)

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture
def tok() -> ChatByteTokenizer:
    return ChatByteTokenizer()


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_alpaca_masks_only_the_response(tok: ChatByteTokenizer) -> None:
    msgs = [{"role": "user", "content": "Add"}, {"role": "assistant", "content": "4"}]
    ids, mask = render_alpaca(msgs, tok)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    prompt = ALPACA_PROMPT.format(instruction="Add")
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == prompt
    assert [i for i, m in zip(ids, mask) if m] == [ord("4"), tok.eos_id]


def test_chat_masks_every_assistant_turn(tok: ChatByteTokenizer) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]  # fmt: skip
    ids, mask = render_chat(msgs, tok)
    assert tok.decode(ids) == tok.format_chat(msgs, add_generation_prompt=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>\nok<|im_end|>\n"
    # the prompt part is exactly what inference feeds the model for the first answer
    first = tok.encode(tok.format_chat(msgs[:2]), allow_special=True)
    assert ids[: len(first)] == first and not any(mask[: len(first)])


def test_real_chat_template_prefix(smollm2_gguf: Path) -> None:
    from llamaforge import load_tokenizer

    t = load_tokenizer(smollm2_gguf)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = render_chat(msgs, t)
    prompt = t.encode_chat(msgs[:1], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    assert t.decode([i for i, m in zip(ids, mask) if m]) == "4<|im_end|>\n"


def test_bad_records_are_reported_by_line(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},                                   # 1 ok
        {"instruction": "a"},                                                  # 2 missing output
        "",                                                                     # 3 blank: ignored
        {"instruction": "a", "output": "   "},                                 # 4 empty response
        "{not json",                                                            # 5 invalid JSON
        {"instruction": "x" * 500, "output": "y"},                             # 6 too long
        {"messages": [{"role": "user", "content": "q"}]},                      # 7 no assistant
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},  # 8 ok
        {"instruction": 3, "output": "x"},                                      # 9 bad type
        [1, 2],                                                                 # 10 not an object
    ])  # fmt: skip
    examples, report = load_examples(path, tok, seq_len=256, template="chat")
    assert [e.line for e in examples] == [1, 8]
    assert report.total == 9 and report.kept == 2 and report.n_skipped == 7
    lines = {reason: [where for where, _ in items] for reason, items in report.skipped.items()}
    assert lines == {"missing field": ["line 2"], "empty response": ["line 4", "line 7"], "invalid JSON": ["line 5"],
                     "too long": ["line 6"], "bad field": ["line 9"], "not an object": ["line 10"]}  # fmt: skip
    text = report.summary()
    assert "line 6" in text and "too long (1)" in text


def test_nothing_valid_is_an_error(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    path = _write(tmp_path / "d.jsonl", [{"instruction": "a"}, {"output": "b"}])
    with pytest.raises(UserError, match=r"(?s)no usable examples.*line 1.*line 2"):
        load_examples(path, tok, seq_len=64)


def test_json_array_line_numbers(tmp_path: Path, tok: ChatByteTokenizer) -> None:
    records = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c"},
        {"instruction": "d", "input": "e", "output": "f"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, indent=2))  # each record spans several lines
    parsed = list(read_records(path))
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == "{"]
    assert [r.line for r in parsed] == starts and [r.index for r in parsed] == [0, 1, 2]
    examples, report = load_examples(path, tok, seq_len=512, template="alpaca")
    assert len(examples) == 2 and report.skipped["missing field"][0][0] == f"record 2 (line {starts[1]})"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": \n')
    with pytest.raises(UserError, match="line 4"):
        load_examples(broken, tok, seq_len=64)


def _examples(lengths: list[int]) -> list[Example]:
    out = []
    for n, length in enumerate(lengths):
        toks = [(n * 7 + j) % 250 for j in range(length)]
        out.append(Example(n, toks, [False] * (length // 2) + [True] * (length - length // 2), line=n + 1))
    return out


def test_packing_fits_and_keeps_examples_apart() -> None:
    exs = _examples([5, 9, 3, 7, 2, 8, 4])
    rows = pack_rows([len(e.tokens) for e in exs], range(len(exs)), seq_len=12)
    assert sorted(i for r in rows for i in r) == list(range(len(exs)))
    assert all(sum(len(exs[i].tokens) for i in r) <= 12 for r in rows)
    assert len(rows) < len(exs)
    batch = collate(exs, rows, pad_id=0)
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["attn_mask"]
    # targets: the next token inside the same example where it is a response token, else ignored
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            e = exs[i]
            n = len(e.tokens)
            assert tokens[b, pos : pos + n].tolist() == e.tokens
            want = [e.tokens[j + 1] if e.mask[j + 1] else IGNORE_INDEX for j in range(n - 1)] + [IGNORE_INDEX]
            assert targets[b, pos : pos + n].tolist() == want
            assert mask[b, 0, pos : pos + n, :pos].sum() == 0  # nothing before the example is visible
            pos += n
        assert (targets[b, pos:] == IGNORE_INDEX).all()


def test_packed_loss_equals_separate_examples(tiny_model: torch.nn.Module) -> None:
    exs = _examples([10, 6, 12, 5])
    loss = CausalLMLoss(tiny_model, fused=False)
    with torch.no_grad():
        packed_sum, packed_n = loss(**_args(collate(exs, [[0, 1], [2, 3]], pad_id=0)))
        sep = [loss(**_args(collate(exs, [[i]], pad_id=0))) for i in range(4)]
    assert packed_n == sum(n for _, n in sep) == sum(e.n_targets for e in exs)
    torch.testing.assert_close(packed_sum, sum(s for s, _ in sep), atol=1e-4, rtol=1e-5)


def _args(batch: dict) -> dict:
    return {"tokens": batch["tokens"], "targets": batch["targets"], "attn_mask": batch.get("attn_mask")}


def test_loader_ranks_epochs_and_resume() -> None:
    exs = _examples([3 + (i * 5) % 11 for i in range(40)])
    one = SFTLoader(exs, seq_len=16, micro_batch_size=2, grad_accum_steps=2, world_size=1, seed=3)
    steps = [one.next_step() for _ in range(10)]  # crosses epoch boundaries
    assert one.epoch >= 1
    # two ranks with half the micro-batch see the same global batch
    ranks = [SFTLoader(exs, 16, 1, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for step in steps[:3]:
        parts = [rk.next_step() for rk in ranks]
        for m in range(2):
            joined = torch.cat([parts[0][m]["targets"][:, :16].flatten(), parts[1][m]["targets"][:, :16].flatten()])
            assert (joined != IGNORE_INDEX).sum() == (step[m]["targets"] != IGNORE_INDEX).sum()
    # resuming from a state continues exactly
    fresh = SFTLoader(exs, 16, 2, 2, seed=3)
    for _ in range(4):
        fresh.next_step()
    resumed = SFTLoader(exs, 16, 2, 2, seed=3)
    resumed.load_state_dict(fresh.state_dict())
    for a, b in zip([fresh.next_step() for _ in range(6)], steps[4:]):
        assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    with pytest.raises(UserError, match="rows_per_step"):
        SFTLoader(exs, 16, 4, 2, seed=3).load_state_dict(fresh.state_dict())


def test_validation_every_example_once_balanced_over_ranks() -> None:
    exs = _examples([4, 9, 6, 3, 11])
    ranks = [SFTValidation(exs, seq_len=12, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) >= 1
    total = sum(int((b["targets"] != IGNORE_INDEX).sum()) for v in ranks for b in v)
    assert total == sum(e.n_targets for e in exs)


def test_split_is_deterministic_and_disjoint() -> None:
    exs = _examples([4] * 100)
    train, val = split_examples(exs, 0.1, seed=0)
    again = split_examples(exs, 0.1, seed=0)
    assert [e.index for e in val] == [e.index for e in again[1]] and len(val) == 10
    assert not {e.index for e in train} & {e.index for e in val}
    assert split_examples(exs[:1], 0.5)[1] == []


def test_qlora_under_tensor_parallelism_is_refused_when_the_recipe_is_read() -> None:
    """A quantized base is not split over tensor-parallel ranks (LoRA on a float base is): refused before any weight
    is read, naming both options."""
    base = {"model.from_checkpoint": "m", "finetune.method": "qlora", "parallel.tp": "2"}
    with pytest.raises(UserError, match=r"finetune.method qlora does not run with parallel.tp 2 .* use --method lora"):
        FinetuneRecipe.load(None, base)
    assert FinetuneRecipe.load(None, {**base, "finetune.method": "lora"}).parallel.tp == 2
