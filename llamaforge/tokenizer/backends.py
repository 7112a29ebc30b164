"""The tokenizer backends: SentencePiece, tiktoken and Hugging Face ``tokenizers`` (each the field's own library),
and ``load_tokenizer`` that picks one for a file or directory.

- SentencePiece files use ``sentencepiece``; a GGUF ``llama`` vocabulary is rebuilt into a SentencePiece
  model (pieces, scores and types map one to one), so it tokenizes exactly as llama.cpp's SPM does;
- tiktoken files use ``tiktoken`` with the pattern and special tokens that Meta's reference defines;
- ``tokenizer.json`` uses ``tokenizers``; a GGUF ``gpt2`` vocabulary is rebuilt into a ``tokenizers``
  byte-level BPE whose pre-tokenizer is the one llama.cpp applies for ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TokenizerError
from . import formats as fmt
from .base import BaseTokenizer, TextDecoder


class _StreamDecoder(TextDecoder):
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


# --- SentencePiece --------------------------------------------------------------------------------
class SentencePieceTokenizer(BaseTokenizer):
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

    def _encode_continuation(self, text: str) -> list[int]:
        if not self.add_dummy_prefix:
            return self.sp.encode(text)
        if self._nodummy is None:  # Meta drops the dummy space by encoding "☺" + text; this model never adds it
            import sentencepiece as spm

            self._nodummy = spm.SentencePieceProcessor()
            self._nodummy.LoadFromSerializedProto(fmt.sp_proto_without_dummy_prefix(self.model_proto))
        return self._nodummy.encode(text)

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


class TiktokenTokenizer(BaseTokenizer):
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
        from ..checkpoint import atomic_output

        directory = super().save_pretrained(directory)
        tk, _ = fmt.hf_from_gguf_bpe(self.gguf_metadata(), str(self.path))
        with atomic_output(directory / "tokenizer.json", is_dir=False) as tmp:
            tmp.write_text(tk.to_str(pretty=True), encoding="utf-8")
        return directory


# --- Hugging Face tokenizers ----------------------------------------------------------------------
class HFTokenizer(BaseTokenizer):
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
        self._continuation: Any = None
        added = tk.get_added_tokens_decoder()
        special = {t.content: i for i, t in added.items() if t.special}
        bos_id, eos_id = (x if isinstance(x, int) or x is None else tk.token_to_id(x) for x in (bos, eos))
        if "add_bos_default" not in kw:
            probe = tk.encode("a", add_special_tokens=True).ids
            kw["add_bos_default"] = bos_id is not None and bool(probe) and probe[0] == bos_id
        if "chat_format" not in kw:
            marks = (("<|start_header_id|>", "llama3"), ("<|header_start|>", "llama4"), ("[INST]", "llama2"))
            kw["chat_format"] = next((f for name, f in marks if tk.token_to_id(name) is not None), None)
        # Ids may skip numbers (a tokenizer.json whose vocab leaves gaps): the ids run up to the largest one.
        size = max(tk.get_vocab_size(with_added_tokens=True), max(tk.get_vocab(with_added_tokens=True).values(),
                                                                  default=-1) + 1)  # fmt: skip
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

    def _make_decoder(self, skip_special: bool) -> TextDecoder:
        return _StreamDecoder(self, skip_special)

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._tk.id_to_token(token_id)

    def _encode_continuation(self, text: str) -> list[int]:
        if self._continuation is None:  # the same tokenizer without a Metaspace/Prepend dummy "▁" (as transformers'
            self._continuation = _without_dummy_prefix(self._plain)  # CodeLlamaTokenizer encodes a suffix)
        return self._continuation.encode(text, add_special_tokens=False).ids

    def _piece_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    def gguf_metadata(self) -> dict[str, Any]:
        if self._gguf is not None:
            return dict(self._gguf)
        return self._common_gguf(fmt.gguf_from_tokenizer_json(json.loads(self._tk.to_str()), self.source))

    def _files_for_save(self) -> tuple[str, bytes, str]:
        return "tokenizer.json", self._tk.to_str(pretty=True).encode(), "PreTrainedTokenizerFast"


def _without_dummy_prefix(tk: Any) -> Any:
    """A copy of a ``tokenizers.Tokenizer`` that adds no leading "▁" (a Metaspace pre-tokenizer's prepend, a
    normalizer's Prepend("▁")); other tokenizers are returned as they are."""
    from tokenizers import Tokenizer as HFTok

    data = json.loads(tk.to_str())
    changed = False

    def strip(node: Any) -> Any:
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and (
                node.get("prepend_scheme", "never") != "never" or node.get("add_prefix_space")
            ):
                changed = True
                node = {**node, **{k: v for k, v in (("prepend_scheme", "never"), ("add_prefix_space", False))
                                   if k in node}}  # fmt: skip
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                changed = True
                return None
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, list):
            return [x for x in (strip(v) for v in node) if x is not None]
        return node

    data["normalizer"], data["pre_tokenizer"] = strip(data.get("normalizer")), strip(data.get("pre_tokenizer"))
    if not changed:
        return tk
    copy = HFTok.from_str(json.dumps(data))
    copy.encode_special_tokens = tk.encode_special_tokens
    return copy


# --- loading --------------------------------------------------------------------------------------
def load_tokenizer(source: str | os.PathLike) -> BaseTokenizer:
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
    try:
        if fmt.is_tiktoken_file(path):
            return TiktokenTokenizer(path)
        template = _read_chat_template(path.parent)
        return SentencePieceTokenizer(path.read_bytes(), source=str(path), chat_template=template)
    except TokenizerError:
        raise
    except (ValueError, RuntimeError, OSError, IndexError, KeyError, struct.error) as exc:
        # sentencepiece raises RuntimeError/OSError on a damaged model, our protobuf reader ValueError/struct.error
        message = str(exc).removeprefix(f"{path}: ")
        raise TokenizerError(f"{path}: not a tokenizer.model llamaforge can read ({message})") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_chat_template(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    template = _read_json(config).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (directory / "chat_template.jinja").is_file():
        config = directory / "chat_template.jinja"
        try:
            template = config.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"{config}: not a UTF-8 text file ({exc.reason})") from None
    if not template:
        config = directory / "chat_template.json"
        template = _read_json(config).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config}: chat_template must be a string, got {type(template).__name__}")
    return template or None


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _load_hf(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    try:
        tk = HFTok.from_file(str(path))
    except BaseException as exc:  # a bare Exception on malformed files, and pyo3's PanicException (a BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise TokenizerError(f"{path}: not a tokenizer.json that the tokenizers library can read ({exc})") from None
    directory = path.parent
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    bos = _token_text(config.get("bos_token", special_map.get("bos_token")))
    eos = _token_text(config.get("eos_token", special_map.get("eos_token")))
    for key, value in (("bos_token", bos), ("eos_token", eos)):
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: {key} must be a string, got {value!r}")
    stops: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(directory / name).get("eos_token_id")
        stops += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    stops = [i for i in stops if isinstance(i, int) and not isinstance(i, bool)]
    kw: dict[str, Any] = {}
    if isinstance(config.get("add_bos_token"), bool):
        kw["add_bos_default"] = config["add_bos_token"]
    return HFTokenizer(
        tk, bos=bos, eos=eos, source=str(path), chat_template=_read_chat_template(directory), extra_stop_ids=stops, **kw
    )


def _load_gguf(path: Path) -> BaseTokenizer:
    meta = fmt.read_gguf_tokenizer_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if not meta.get("tokenizer.ggml.tokens"):
        raise FileNotFoundError(f"{path}: this GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    _check_gguf_vocabulary(meta, path)
    common = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "source": str(path),
        "extra_stop_ids": [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")],
    }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    try:
        if model == "llama":
            proto = fmt.sp_proto_from_gguf(meta, str(path))
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
            return SentencePieceTokenizer(proto, bos_id=bos, eos_id=eos, add_bos_default=add_bos, gguf=meta, **common)
        if model == "gpt2":
            tk, add_bos = fmt.hf_from_gguf_bpe(meta, str(path))
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
            return HFTokenizer(tk, bos=bos, eos=eos, gguf=meta, add_bos_default=add_bos, **common)
    except TokenizerError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:  # sentencepiece / tokenizers refusing the vocabulary
        message = str(exc).removeprefix(f"{path}: ")
        raise TokenizerError(f"{path}: the GGUF vocabulary cannot be used ({message})") from None
    raise TokenizerError(
        f"{path}: tokenizer.ggml.model = {model!r} is not supported (llamaforge reads 'llama' and 'gpt2')"
    )


_GGUF_TOKEN_IDS = ("bos", "eos", "unknown", "eot", "eom")


def _check_gguf_vocabulary(meta: dict[str, Any], path: Path) -> None:
    """Refuse, naming the key, a GGUF vocabulary whose values have the wrong type, length or range."""

    def fail(key: str, problem: str) -> TokenizerError:
        return TokenizerError(f"{path}: {key} {problem}")

    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise fail("tokenizer.ggml.tokens", "must be an array of strings")
    for i, token in enumerate(tokens):
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise fail(f"tokenizer.ggml.tokens[{i}]", f"is not valid UTF-8: {token!r}") from None
    for key, kind in (("scores", (int, float)), ("token_type", (int,)), ("merges", (str,))):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise fail(f"tokenizer.ggml.{key}", f"must be an array of {kind[0].__name__}")
        if key != "merges" and len(value) != len(tokens):
            raise fail(f"tokenizer.ggml.{key}", f"has {len(value)} entries for {len(tokens)} tokens")
        if key == "token_type" and any(not 0 <= t <= fmt.BYTE for t in value):
            raise fail("tokenizer.ggml.token_type", f"holds a type outside 0..{fmt.BYTE}")
        if key == "merges":
            for n, merge in enumerate(value):
                try:
                    merge.encode("utf-8")
                except UnicodeEncodeError:
                    raise fail(f"tokenizer.ggml.merges[{n}]", f"is not valid UTF-8: {merge!r}") from None
    for name in _GGUF_TOKEN_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = meta.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens)
        ):
            raise fail(key, f"= {value!r} is not a token id (0..{len(tokens) - 1})")
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix", "remove_extra_whitespaces"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not isinstance(value, (bool, int)):
            raise fail(f"tokenizer.ggml.{key}", f"must be a boolean, got {value!r}")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(key, f"must be a string, got {value!r}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise fail(key, "is not valid UTF-8") from None
