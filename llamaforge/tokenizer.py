"""Tokenizers for every LLaMA-family format behind one interface.

``load_tokenizer(source)`` reads a SentencePiece ``tokenizer.model`` (LLaMA 1/2, Code Llama), a tiktoken
``tokenizer.model`` (Llama 3 and 4, with Meta's pre-tokenizer pattern and special tokens), a Hugging Face
``tokenizer.json``, or the vocabulary inside a GGUF file. Each backend is the field's own library, so the
ids are those of the model's reference tokenizer:

- SentencePiece files use ``sentencepiece``; a GGUF ``llama`` vocabulary is rebuilt into a SentencePiece
  model (pieces, scores and types map one to one), so it tokenizes exactly as llama.cpp's SPM does;
- tiktoken files use ``tiktoken`` with the pattern and special tokens that Meta's reference defines;
- ``tokenizer.json`` uses ``tokenizers``; a GGUF ``gpt2`` vocabulary is rebuilt into a ``tokenizers``
  byte-level BPE whose pre-tokenizer is the one llama.cpp applies for ``tokenizer.ggml.pre``.

Text is ordinary text unless ``allow_special=True``: a user typing ``<|eot_id|>`` gets the tokens of
those characters. Bytes are accepted too; invalid UTF-8 becomes U+FFFD (one per bad byte, like llama.cpp)
and lone surrogates become U+FFFD, so encoding never fails on odd input.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .tokenizers import formats as fmt

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


class IncrementalDecoder:
    """Turns a stream of token ids into text, returning only complete characters.

    ``add(id)`` returns the new text (possibly ""); ``flush()`` returns what is left at the end of the
    stream. The concatenation equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
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


class _StreamDecoder(IncrementalDecoder):
    """Incremental decoding for Hugging Face tokenizers, via ``tokenizers.decoders.DecodeStream``."""

    def __init__(self, tokenizer: HFTokenizer, skip_special: bool = False) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._stream = DecodeStream(skip_special_tokens=skip_special)
        self._ids: list[int] = []
        self._done = 0  # ids whose text has been returned
        self._text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tokenizer._tk, int(token_id))
        if piece is None:
            return ""
        self._done = len(self._ids)
        self._text += piece
        return piece

    def flush(self) -> str:
        if self._done == len(self._ids):
            return ""
        # A sequence that ends inside a character: whatever decode() makes of the whole stream.
        rest = self._tokenizer.decode(self._ids, skip_special=self._skip_special)[len(self._text) :]
        self._done = len(self._ids)
        self._text += rest
        return rest


class Tokenizer:
    """The interface every backend provides. Construct through ``load_tokenizer``."""

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

    # --- decoding ---------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their text unless ``skip_special``."""
        data = self._ids_to_bytes([int(i) for i in ids], skip_special, self._new_decode_state())
        return data.decode("utf-8", self._utf8_errors)

    def decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        """A fresh incremental decoder for streaming."""
        return IncrementalDecoder(self, skip_special)

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
        from .chat import render_chat

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
        from .chat import render_chat

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
        from .checkpoint import atomic_output

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
            from .chat import named_template

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


# --- SentencePiece --------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2 and Code Llama ``tokenizer.model``, and GGUF ``llama`` vocabularies rebuilt as one."""

    kind = "sentencepiece"
    _utf8_errors = "llamaforge.replace_each_byte"  # sentencepiece replaces each invalid byte

    def __init__(self, model_proto: bytes, source: str = "", gguf: dict[str, Any] | None = None, **kw: Any) -> None:
        import sentencepiece as spm

        self.model_proto = model_proto
        self._gguf = gguf  # the GGUF keys it was built from, returned as they are by gguf_metadata()
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.pieces, self.scores, self.types, self.add_dummy_prefix = fmt.read_sp_proto(model_proto)
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        special = {p: i for i, p in enumerate(self.pieces) if self.types[i] in (fmt.CONTROL, fmt.UNKNOWN)}
        kw.setdefault("bos_id", self.sp.bos_id() if self.sp.bos_id() >= 0 else None)
        kw.setdefault("eos_id", self.sp.eos_id() if self.sp.eos_id() >= 0 else None)
        kw.setdefault("chat_format", "codellama" if "▁<PRE>" in self._ids else "llama2")
        super().__init__(special=special, vocab_size=len(self.pieces), source=source, **kw)
        self._nodummy = None

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _new_decode_state(self) -> dict[str, Any]:
        return {"first": True}

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict[str, Any]) -> bytes:
        # sentencepiece's decoding: ▁ is a space, control pieces are silent, <0xNN> are raw bytes, <unk> is
        # " ⁇ ", and the dummy-prefix space of the first non-control piece is dropped.
        self._check_ids(ids)
        out = bytearray()
        for i in ids:
            kind = self.types[i]
            if kind == fmt.CONTROL:
                if not skip_special:
                    out += self.pieces[i].encode()
                continue
            if kind == fmt.BYTE:
                out.append(int(self.pieces[i][3:5], 16))
            elif kind == fmt.UNKNOWN:
                out += " \u2047 ".encode()
            else:
                piece = self.pieces[i]
                if state["first"] and self.add_dummy_prefix and piece.startswith("▁"):
                    piece = piece[1:]
                out += piece.replace("▁", " ").encode()
            state["first"] = False
        return bytes(out)

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self.pieces[token_id]

    def _piece_id(self, piece: str) -> int | None:
        found = self._ids.get(piece)
        return self._ids.get("▁" + piece) if found is None else found  # Code Llama's "▁<PRE>" as "<PRE>"

    def encode_infill(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """Code Llama's fill-in-the-middle prompt (``<PRE> prefix <SUF>suffix <MID>``), as Meta builds it."""
        pre, suf, mid = (self.token_id(n) for n in ("<PRE>", "<SUF>", "<MID>"))
        if None in (pre, suf, mid):
            raise ValueError(
                f"{self.source or 'tokenizer'}: no infilling tokens (<PRE>, <SUF>, <MID>); "
                "infilling needs a Code Llama tokenizer"
            )
        if self._nodummy is None:  # the suffix is encoded without the leading dummy space
            import sentencepiece as spm

            self._nodummy = spm.SentencePieceProcessor()
            self._nodummy.LoadFromSerializedProto(fmt.sp_proto_without_dummy_prefix(self.model_proto))
        suffix_ids = self._nodummy.encode(clean_text(suffix))
        prefix_ids = self.encode(prefix)
        if suffix_first:
            return [self._require("bos_id"), pre, suf, *suffix_ids, mid, *prefix_ids]  # type: ignore[list-item]
        return [self._require("bos_id"), pre, *prefix_ids, suf, *suffix_ids, mid]  # type: ignore[list-item]

    def gguf_metadata(self) -> dict[str, Any]:
        if self._gguf is not None:
            return dict(self._gguf)
        meta: dict[str, Any] = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": list(self.pieces),
            "tokenizer.ggml.scores": list(self.scores),
            "tokenizer.ggml.token_type": list(self.types),
            "tokenizer.ggml.add_space_prefix": self.add_dummy_prefix,
        }
        unk = self.sp.unk_id()
        if unk >= 0:
            meta["tokenizer.ggml.unknown_token_id"] = unk
        if self.sp.pad_id() >= 0:
            meta["tokenizer.ggml.padding_token_id"] = self.sp.pad_id()
        return self._common_gguf(meta)

    def _files_for_save(self) -> tuple[str, bytes, str]:
        return "tokenizer.model", self.model_proto, "LlamaTokenizer"


# --- tiktoken (Llama 3 and 4) ---------------------------------------------------------------------
# Meta's reference encodes at most this many characters per tiktoken call, and cuts runs of whitespace or
# non-whitespace longer than MAX_RUN (tiktoken's regex backtracking is quadratic on them).
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{TIKTOKEN_MAX_RUN + 1},}}|(?<!\S)\S{{{TIKTOKEN_MAX_RUN + 1},}}")
_SPACE, _NON_SPACE = re.compile(r"\s"), re.compile(r"\S")


def _has_long_run(chunk: str) -> bool:
    """Whether `chunk` has a run of more than TIKTOKEN_MAX_RUN whitespace or non-whitespace characters.

    Such a run covers two sample points half a run apart, with nothing of the other class between them;
    probing each window for one character of the other class stops after a few characters in real text.
    """
    step = TIKTOKEN_MAX_RUN // 2
    for p in range(0, len(chunk) - step, step):
        other = _NON_SPACE if chunk[p].isspace() else _SPACE
        if other.search(chunk, p, p + step + 1) is None:
            return True
    return False


def split_long_runs(text: str) -> list[str]:
    """The pieces Meta's reference feeds tiktoken: 400k-character chunks, with over-long runs cut.

    Same result as Meta's per-character loop (runs are measured with ``str.isspace``, which is what ``\\s``
    means to Python's ``re``), at a cost that ordinary text hardly notices.
    """
    pieces: list[str] = []
    for begin in range(0, len(text), TIKTOKEN_MAX_CHARS):
        chunk = text[begin : begin + TIKTOKEN_MAX_CHARS]
        if not _has_long_run(chunk):
            pieces.append(chunk)
            continue
        cuts = [
            run.start() + k
            for run in _LONG_RUN.finditer(chunk)
            for k in range(TIKTOKEN_MAX_RUN, run.end() - run.start(), TIKTOKEN_MAX_RUN)
        ]
        edges = [0, *cuts, len(chunk)]
        pieces += [chunk[a:b] for a, b in itertools.pairwise(edges)]
    return pieces or [""]


class TiktokenTokenizer(Tokenizer):
    """Meta's tiktoken-format ``tokenizer.model`` for Llama 3.x (128k base tokens) and Llama 4 (200k)."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike) -> None:
        import tiktoken

        self.path = Path(path)
        ranks = fmt.read_tiktoken_ranks(self.path)
        generation = fmt.TIKTOKEN_GENERATIONS.get(len(ranks))
        if generation is None:
            known = ", ".join(f"{n} ({g['name']})" for n, g in fmt.TIKTOKEN_GENERATIONS.items())
            raise ValueError(f"{path}: a tiktoken tokenizer with {len(ranks)} base tokens; llamaforge knows {known}")
        self.generation = generation["name"]
        special = {name: len(ranks) + i for i, name in enumerate(generation["special"]())}
        self.enc = tiktoken.Encoding(
            name=self.path.name, pat_str=generation["pattern"], mergeable_ranks=ranks, special_tokens=special
        )
        self.pattern = generation["pattern"]
        self._ranks = ranks
        self._all_special = frozenset(special)
        eot, eom = generation["eot"], generation["eom"]
        super().__init__(
            special=special,
            bos_id=special["<|begin_of_text|>"],
            eos_id=special["<|end_of_text|>"],
            vocab_size=len(ranks) + len(special),
            chat_format=self.generation,
            add_bos_default=True,
            extra_stop_ids=(special[eot], special[eom]),
            source=str(path),
        )

    def _encode_ordinary(self, text: str) -> list[int]:
        if len(text) <= TIKTOKEN_MAX_RUN:
            return self.enc.encode_ordinary(text)
        return [i for piece in split_long_runs(text) for i in self.enc.encode_ordinary(piece)]

    def _encode_special(self, text: str) -> list[int]:
        pieces = [text] if len(text) <= TIKTOKEN_MAX_RUN else split_long_runs(text)
        return [i for p in pieces for i in self.enc.encode(p, allowed_special=self._all_special, disallowed_special=())]

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict[str, Any]) -> bytes:
        self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self.enc.decode_bytes(ids)

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        if token_id in self._special_ids:
            return self._special_ids[token_id]
        return fmt.bytes_to_bytelevel(self.enc.decode_single_token_bytes(token_id))

    def _piece_id(self, piece: str) -> int | None:
        data = fmt.bytelevel_to_bytes(piece)
        return None if data is None else self._ranks.get(data)

    def gguf_metadata(self) -> dict[str, Any]:
        by_rank = sorted(self._ranks.items(), key=lambda kv: kv[1])
        tokens = [fmt.bytes_to_bytelevel(b) for b, _ in by_rank] + list(self.special_tokens)
        types = [fmt.NORMAL] * len(by_rank) + [fmt.CONTROL] * len(self.special_tokens)
        meta = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": fmt.TIKTOKEN_GGUF_PRE[self.generation],
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": fmt.merges_from_ranks(self._ranks),
        }
        pad = self.token_id("<|finetune_right_pad_id|>") or self.token_id("<|finetune_right_pad|>")
        if pad is not None:
            meta["tokenizer.ggml.padding_token_id"] = pad
        return self._common_gguf(meta)

    def _files_for_save(self) -> tuple[str, bytes, str]:
        return "tokenizer.model", self.path.read_bytes(), "PreTrainedTokenizerFast"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Meta's tokenizer.model (read back by llamaforge, exactly) and a tokenizer.json with the special tokens,
        which is what transformers, vLLM and llama.cpp's converter read in a Hugging Face directory."""
        from .checkpoint import atomic_output

        directory = super().save_pretrained(directory)
        tk, _ = fmt.hf_from_gguf_bpe(self.gguf_metadata(), str(self.path))
        with atomic_output(directory / "tokenizer.json", is_dir=False) as tmp:
            tmp.write_text(tk.to_str(pretty=True), encoding="utf-8")
        return directory


# --- Hugging Face tokenizers ----------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: from ``tokenizer.json``, or built from a GGUF ``gpt2`` vocabulary."""

    kind = "huggingface"

    def __init__(
        self,
        tk: Any,
        *,
        bos: str | int | None,
        eos: str | int | None,
        source: str = "",
        gguf: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        from tokenizers import Tokenizer as HFTok

        self._tk = tk
        self._plain = HFTok.from_str(tk.to_str())  # same tokenizer, special-token text taken literally
        self._plain.encode_special_tokens = True
        self._gguf = gguf
        added = tk.get_added_tokens_decoder()
        special = {t.content: i for i, t in added.items() if t.special}
        bos_id, eos_id = (x if isinstance(x, int) or x is None else tk.token_to_id(x) for x in (bos, eos))
        if "add_bos_default" not in kw:
            probe = tk.encode("a", add_special_tokens=True).ids
            kw["add_bos_default"] = bos_id is not None and bool(probe) and probe[0] == bos_id
        if "chat_format" not in kw:
            marks = (("<|start_header_id|>", "llama3"), ("<|header_start|>", "llama4"), ("[INST]", "llama2"))
            kw["chat_format"] = next((f for name, f in marks if tk.token_to_id(name) is not None), None)
        size = tk.get_vocab_size(with_added_tokens=True)
        super().__init__(special=special, bos_id=bos_id, eos_id=eos_id, vocab_size=size, source=source, **kw)

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def _encode_special(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return _StreamDecoder(self, skip_special)

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._tk.id_to_token(token_id)

    def _piece_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    def gguf_metadata(self) -> dict[str, Any]:
        if self._gguf is not None:
            return dict(self._gguf)
        return self._common_gguf(fmt.gguf_from_tokenizer_json(json.loads(self._tk.to_str()), self.source))

    def _files_for_save(self) -> tuple[str, bytes, str]:
        return "tokenizer.json", self._tk.to_str(pretty=True).encode(), "PreTrainedTokenizerFast"


# --- loading --------------------------------------------------------------------------------------
def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory, a tokenizer.model / tokenizer.json file, or a .gguf file.

    Raises FileNotFoundError when a directory holds no tokenizer.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        meta_file = path / "tokenizer.model"
        if meta_file.is_file() and fmt.is_tiktoken_file(meta_file):  # Meta's own file beside a derived tokenizer.json
            return load_tokenizer(meta_file)
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")
    if path.suffix == ".gguf" or fmt.is_gguf(path):
        return _load_gguf(path)
    if path.name.endswith(".json"):
        return _load_hf(path)
    if fmt.is_tiktoken_file(path):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path.read_bytes(), source=str(path), chat_template=_read_chat_template(path.parent))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def _read_chat_template(directory: Path) -> str | None:
    template = _read_json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template or None


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _load_hf(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    try:
        tk = HFTok.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a tokenizer.json that the tokenizers library can read ({exc})") from exc
    directory = path.parent
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    bos = _token_text(config.get("bos_token", special_map.get("bos_token")))
    eos = _token_text(config.get("eos_token", special_map.get("eos_token")))
    stops: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(directory / name).get("eos_token_id")
        stops += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    kw: dict[str, Any] = {}
    if isinstance(config.get("add_bos_token"), bool):
        kw["add_bos_default"] = config["add_bos_token"]
    return HFTokenizer(
        tk, bos=bos, eos=eos, source=str(path), chat_template=_read_chat_template(directory), extra_stop_ids=stops, **kw
    )


def _load_gguf(path: Path) -> Tokenizer:
    meta = fmt.read_gguf_tokenizer_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if not meta.get("tokenizer.ggml.tokens"):
        raise FileNotFoundError(f"{path}: this GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    common = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "source": str(path),
        "extra_stop_ids": [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")],
    }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if model == "llama":
        proto = fmt.sp_proto_from_gguf(meta, str(path))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        return SentencePieceTokenizer(proto, bos_id=bos, eos_id=eos, add_bos_default=add_bos, gguf=meta, **common)
    if model == "gpt2":
        tk, add_bos = fmt.hf_from_gguf_bpe(meta, str(path))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        return HFTokenizer(tk, bos=bos, eos=eos, gguf=meta, add_bos_default=add_bos, **common)
    raise ValueError(f"{path}: tokenizer.ggml.model = {model!r} is not supported (llamaforge reads 'llama' and 'gpt2')")


__all__ = [
    "HFTokenizer",
    "IncrementalDecoder",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "clean_text",
    "load_tokenizer",
    "split_long_runs",
]
