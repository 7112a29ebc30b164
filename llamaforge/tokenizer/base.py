"""The base of every tokenizer backend: encoding with special tokens, byte-level decoding, the one incremental
decoder (``TextDecoder``), chat prompts and export. A backend implements ``_encode_ordinary``, ``_ids_to_bytes``,
``id_to_piece`` and the export hooks; see ``backends.py``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_STOP_NAMES = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|eot|>",
    "<|eom|>",
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "▁<EOT>",
    "<|end|>",
)
# Fill-in-the-middle tokens (prefix, suffix, middle) by name, as llama.cpp finds them when a GGUF does not declare
# them: Llama 4's, StarCoder's and Code Llama's spellings.
_FIM_NAMES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # Code Llama's pieces
)
_GGUF_FIM_KEYS = (("fim_pre", "fim_suf", "fim_mid"), ("prefix", "suffix", "middle"))  # current and older GGUF keys


def _replace_each_byte(exc: UnicodeError) -> tuple[str, int]:
    # One U+FFFD per invalid byte, as llama.cpp and sentencepiece do (Python's "replace" merges a run).
    return "\ufffd" * (exc.end - exc.start), exc.end  # type: ignore[attr-defined]


codecs.register_error("llamaforge.replace_each_byte", _replace_each_byte)


def clean_text(text: str | bytes) -> str:
    """`text` as a str that every backend accepts: bad UTF-8 bytes and lone surrogates become U+FFFD."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", "llamaforge.replace_each_byte")
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: pair the valid ones, replace the lone ones
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class TextDecoder:
    """Turns a stream of token ids into text, returning only complete characters.

    ``add(id)`` returns the new text (possibly ""); ``flush()`` returns what is left at the end of the
    stream. The concatenation equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: BaseTokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._state = tokenizer._new_decode_state()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tokenizer._utf8_errors)

    def add(self, token_id: int) -> str:
        data = self._tokenizer._ids_to_bytes([int(token_id)], self._skip_special, self._state)
        return self._utf8.decode(data)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    def primed(self, context: Sequence[int]) -> TextDecoder:
        """This decoder after `context` was fed and its text dropped."""
        for token_id in context:
            self.add(token_id)
        return self


class BaseTokenizer:
    """What every backend shares; construct one through ``load_tokenizer``. Satisfies the ``Tokenizer`` protocol."""

    kind = ""  # "sentencepiece" | "tiktoken" | "huggingface"
    _utf8_errors = "replace"

    def __init__(
        self,
        *,
        special: dict[str, int],
        bos_id: int | None,
        eos_id: int | None,
        vocab_size: int,
        chat_template: str | None = None,
        chat_format: str | None = None,
        add_bos_default: bool = True,
        extra_stop_ids: Iterable[int] = (),
        source: str = "",
    ) -> None:
        self.special_tokens = dict(special)  # text -> id of tokens that are never produced from plain text
        self._special_ids = {i: t for t, i in self.special_tokens.items()}
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.chat_format = chat_format  # named format used when there is no jinja template
        self.add_bos_default = add_bos_default
        self.source = source
        stops = {i for i in extra_stop_ids if i is not None}
        if eos_id is not None:
            stops.add(eos_id)
        stops.update(self.special_tokens[name] for name in _STOP_NAMES if name in self.special_tokens)
        code_llama_eot = self._piece_id("▁<EOT>")  # a plain piece in Code Llama's tokenizer.json, still its end
        if code_llama_eot is not None:
            stops.add(code_llama_eot)
        self.stop_ids: set[int] = stops
        self._special_re: re.Pattern[str] | None = None

    # --- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token text is parsed only when ``allow_special`` is true."""
        text = clean_text(text)
        ids = self._encode_special(text) if allow_special else self._encode_ordinary(text)
        if bos:
            ids.insert(0, self._require("bos_id"))
        if eos:
            ids.append(self._require("eos_id"))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_special(self, text: str) -> list[int]:
        """Split at special-token text, encode the rest as ordinary text (SentencePiece's way)."""
        if not self.special_tokens:
            return self._encode_ordinary(text)
        if self._special_re is None:
            names = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = re.compile("|".join(re.escape(n) for n in names))
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_ordinary(text[start:])
        return ids

    def _require(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{self.source or 'tokenizer'}: this tokenizer has no {name.replace('_id', '')} token")
        return value

    # --- fill in the middle ------------------------------------------------------------------------
    def fim_ids(self) -> tuple[int, int, int] | None:
        """The (prefix, suffix, middle) infilling token ids: those a GGUF file declares, else the first spelling in
        ``_FIM_NAMES`` this vocabulary has all three of; None when it has none."""
        meta = getattr(self, "_gguf", None) or {}
        for keys in _GGUF_FIM_KEYS:
            ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in keys]
            if all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                return ids[0], ids[1], ids[2]
        for names in _FIM_NAMES:
            found = [self.token_id(n) for n in names]
            if None not in found:
                return found[0], found[1], found[2]  # type: ignore[return-value]
        return None

    def encode_infill(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """The fill-in-the-middle prompt whose completion is the text between `prefix` and `suffix`:
        ``[BOS] <pre> prefix <suf> suffix <mid>``, the suffix encoded as the continuation of other text (no
        dummy-prefix space), as Meta's Code Llama and transformers build it. ``suffix_first``: Code Llama's
        ``[BOS] <PRE> <SUF> suffix <MID> prefix``, or for other vocabularies llama-server's
        ``[BOS] <suf> suffix <pre> prefix <mid>``. A ValueError when the vocabulary has no infilling tokens."""
        fim = self.fim_ids()
        if fim is None:
            raise ValueError(
                f"{self.source or 'tokenizer'}: this model's vocabulary has no fill-in-the-middle tokens (<PRE>/<SUF>/"
                "<MID> or <|fim_prefix|>/<|fim_suffix|>/<|fim_middle|>), so it cannot infill"
            )
        pre, suf, mid = fim
        head = [self._require("bos_id")] if self.add_bos_default and self.bos_id is not None else []
        prefix_ids, suffix_ids = self.encode(prefix), self._encode_continuation(clean_text(suffix))
        if not suffix_first:
            return [*head, pre, *prefix_ids, suf, *suffix_ids, mid]
        if self.id_to_piece(pre).lstrip("▁") == "<PRE>":  # Code Llama's suffix-prefix-middle order
            return [*head, pre, suf, *suffix_ids, mid, *prefix_ids]
        return [*head, suf, *suffix_ids, pre, *prefix_ids, mid]

    def _encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it would be encoded after other text: without a SentencePiece-style dummy-prefix space."""
        return self._encode_ordinary(text)

    # --- decoding ---------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their text unless ``skip_special``."""
        data = self._ids_to_bytes([int(i) for i in ids], skip_special, self._new_decode_state())
        return data.decode("utf-8", self._utf8_errors)

    def decoder(self, skip_special: bool = False, context: Sequence[int] = ()) -> TextDecoder:
        """A fresh incremental decoder for streaming. ``context``: ids that come before the stream (e.g. the end of
        the prompt); they are fed first and their text dropped, so the first new token decodes as it would
        after them (a leading space kept, a character completed)."""
        return self._make_decoder(skip_special).primed(context)

    def _make_decoder(self, skip_special: bool) -> TextDecoder:
        return TextDecoder(self, skip_special)

    def _new_decode_state(self) -> dict[str, Any]:
        return {}

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _check_ids(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")

    # --- pieces and lookups -----------------------------------------------------------------------
    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        """Id of a special token (``"<|eot_id|>"``) or vocabulary piece; None if there is none."""
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self._piece_id(piece)

    def _piece_id(self, piece: str) -> int | None:
        return None

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token."""
        return token_id in self._special_ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_piece(self.eos_id)

    # --- chat -------------------------------------------------------------------------------------
    def format_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template: str | None = None, **kw: Any
    ) -> str:
        """The prompt text for `messages` in this model's chat format (or `template`: a name or jinja text)."""
        from ..chat import render_chat

        return "".join(
            text for text, _ in render_chat(messages, **self._chat_args(template, add_generation_prompt, kw))
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template: str | None = None, **kw: Any
    ) -> list[int]:
        """Token ids of the chat prompt, encoded part by part as the format's reference implementation does.

        Message content is ordinary text in the named formats; a jinja template's output is parsed for
        special tokens as a whole, as transformers does. No BOS is added beyond what the format writes.
        """
        from ..chat import render_chat

        parts = render_chat(messages, **self._chat_args(template, add_generation_prompt, kw))
        return [i for text, special in parts for i in self.encode(text, allow_special=special)]

    def _chat_args(self, template: str | None, add_generation_prompt: bool, kw: dict[str, Any]) -> dict[str, Any]:
        kw.setdefault("bos_token", self.bos_token)
        kw.setdefault("eos_token", self.eos_token)
        return {
            "template": template or self._chat_template_or_format(),
            "add_generation_prompt": add_generation_prompt,
            **kw,
        }

    def _chat_template_or_format(self) -> str:
        template = self.chat_template or self.chat_format
        if not template:
            raise ValueError(
                f"{self.source or 'tokenizer'}: no chat template; pass template= (a jinja template "
                "or one of 'llama2', 'llama3', 'llama4', 'codellama')"
            )
        return template

    # --- export -----------------------------------------------------------------------------------
    def gguf_metadata(self) -> dict[str, Any]:
        """The ``tokenizer.ggml.*`` keys (and ``tokenizer.chat_template``) that describe this tokenizer."""
        raise NotImplementedError

    def _common_gguf(self, meta: dict[str, Any]) -> dict[str, Any]:
        for key, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id)):
            if value is not None:
                meta[f"tokenizer.ggml.{key}"] = value
        meta["tokenizer.ggml.add_bos_token"] = self.add_bos_default
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write Hugging Face tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)."""
        from ..checkpoint import atomic_output

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name, data, tokenizer_class = self._files_for_save()
        with atomic_output(directory / name, is_dir=False) as tmp:
            tmp.write_bytes(data)
        config: dict[str, Any] = {
            "tokenizer_class": tokenizer_class,
            "add_bos_token": self.add_bos_default,
            "add_eos_token": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
        }
        template = self.chat_template
        if not template and self.chat_format:  # other engines know templates, not llamaforge's format names
            from ..chat import named_template

            template = named_template(self.chat_format)
        if template:
            config["chat_template"] = template
        with atomic_output(directory / "tokenizer_config.json", is_dir=False) as tmp:
            tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    def _files_for_save(self) -> tuple[str, bytes, str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} source={self.source!r}>"
