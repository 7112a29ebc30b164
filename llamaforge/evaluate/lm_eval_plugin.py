"""llamaforge as a model backend of lm-evaluation-harness: ``lm_eval --model llamaforge --model_args pretrained=PATH``.

Importing this module registers the backend under the name "llamaforge". lm-eval versions that load
model plug-ins from entry points find it through the package's entry point; with older ones, run
``python -m llamaforge.evaluate.lm_eval_plugin run --model llamaforge ...`` (lm-eval's own command line with
the backend registered), or pass ``LlamaforgeLM(...)`` to ``lm_eval.simple_evaluate``. Model arguments:

- ``pretrained``: anything ``llamaforge.load`` accepts (HF or Meta directory, GGUF file, built-in name);
- ``dtype`` (float32, bfloat16, float16; default: the checkpoint's), ``device`` (default: cpu);
- ``batch_size`` (rows per forward pass), ``max_length`` (default: the model's context);
- ``prefix_reuse`` (default true: each context runs once through the KV cache for all its continuations);
- ``add_bos_token`` (default: the tokenizer's own convention).

Log-likelihoods are computed by ``llamaforge.evaluate.scoring.Scorer``; tokenization of context and
continuation is the harness's own (``TemplateLM._encode_pair``), so results match its Hugging Face
backend on the same weights. ``generate_until`` runs ``llm.generate`` on batches of requests that share
their options, greedily (or sampled, when the task asks for it), and cuts the text at the task's stop strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..llm import LLM, load
from .scoring import Scorer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": None}  # fmt: skip


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("llamaforge")
class LlamaforgeLM(TemplateLM):
    """lm-evaluation-harness model backed by a llamaforge ``LLM``."""

    def __init__(self, pretrained: str | LLM | None = None, *, llm: LLM | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 prefix_reuse: bool | str = True, add_bos_token: bool | str | None = None,
                 max_gen_toks: int = 256, **unused: Any) -> None:  # fmt: skip
        super().__init__()
        if llm is None:
            if isinstance(pretrained, LLM):
                llm = pretrained
            elif pretrained is None:
                raise ValueError("llamaforge: pass model_args pretrained=PATH (a checkpoint llamaforge can load)")
            else:
                key = str(dtype).lower() if dtype is not None else "auto"
                if key not in _DTYPES:
                    raise ValueError(f"llamaforge: unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
                llm = load(pretrained, device=device or "cpu", dtype=_DTYPES[key])
        self.llm = llm
        self.tokenizer = llm.require_tokenizer()
        bos = _flag(add_bos_token)
        self.add_bos = self.tokenizer.add_bos_default if bos is None else bos
        if str(batch_size).startswith("auto"):
            batch_size = 16  # no memory probing on CPU; a fixed, moderate batch
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else llm.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(llm.model, batch_size=self._batch_size, max_length=self._max_length,
                             prefix_reuse=bool(_flag(prefix_reuse)))  # fmt: skip

    # What TemplateLM needs -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return int(eos if eos is not None else self.prefix_token_id)

    @property
    def prefix_token_id(self) -> int:
        token = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if token is None:
            raise ValueError("llamaforge: the tokenizer has no BOS or EOS token to stand for an empty context")
        return int(token)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        ids = list(self.tokenizer.encode(string, bos=False))
        if bos and not (ids and ids[0] == self.tokenizer.bos_id) and self.tokenizer.bos_id is not None:
            ids.insert(0, self.tokenizer.bos_id)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special=skip_special_tokens)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], desc="llamaforge loglikelihood")
        out = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of the model's context, as the HF backend does."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            rolling = get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)  # fmt: skip
            for ctx, cont in map(make_disjoint_window, rolling):
                windows.append((ctx, cont))
                owner.append(i)
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.score(windows, desc="llamaforge rolling loglikelihood")
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation options are generated together on the engine (continuous batching,
        ``batch_size`` at a time); each text is cut at the task's stop strings and the EOS text."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1] or {}, sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        with tqdm(total=len(requests), desc="llamaforge generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1] or {})
                until = kwargs.pop("until", None) or []
                until = list(dict.fromkeys([*([until] if isinstance(until, str) else until), eos_text]))
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
                room = self.max_length - max_new
                if room < 1:
                    raise ValueError(f"llamaforge: max_gen_toks {max_new} leaves no room in a context of "
                                     f"{self.max_length}")  # fmt: skip
                chunk = 4 * self._batch_size  # a few batches per call, so that the bar moves
                for start in range(0, len(members), chunk):
                    part = members[start : start + chunk]
                    prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in part]
                    completions = self.llm.generate(prompts, max_batch=self._batch_size, max_new_tokens=max_new,
                                                    temperature=temperature, stop=until)  # fmt: skip
                    for i, completion in zip(part, completions):
                        text = completion.text
                        for stop in until:  # the engine stops at these; cut again in case one spans the end
                            if stop and stop in text:
                                text = text.split(stop)[0]
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        out[i] = text
                    bar.update(len(part))
        return out  # type: ignore[return-value]


def main() -> None:
    """``python -m llamaforge.evaluate.lm_eval_plugin ARGS``: lm-evaluation-harness's own command line with the
    "llamaforge" backend registered (for lm-eval versions that do not load model plug-ins by entry point)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
