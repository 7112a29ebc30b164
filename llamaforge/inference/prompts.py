"""Prompts into token ids, and the one check that a prompt leaves room to generate.

Every entry point (``LLM.generate/stream/chat``, the engine, the CLI, the server) encodes prompts and checks
their length here, so a prompt that does not fit gets the same ``PromptTooLongError`` (a ValueError) with the
same message everywhere; the server answers it with 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ImageError
from ..tokenizer import Tokenizer
from ..vision import Image, VisionAdapter
from ..vision.inputs import ImageLimits, load_images


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate in the context."""

    def __init__(self, n_prompt: int, limit: int) -> None:
        super().__init__(f"the prompt has {n_prompt} tokens, which leaves no room to generate in the context of "
                         f"{limit} tokens; shorten the prompt")  # fmt: skip
        self.n_prompt, self.limit = n_prompt, limit


def check_fits(ids: Sequence[int], limit: int) -> None:
    """Raise ``PromptTooLongError`` unless at least one token can be generated after `ids` within `limit`."""
    if len(ids) >= limit:
        raise PromptTooLongError(len(ids), limit)


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt ids as ints, or a ValueError naming the problem (empty, an id outside the vocabulary)."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    out = [int(t) for t in ids]
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return out


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A plain-text prompt's ids, with a BOS token when the tokenizer's model expects one."""
    return list(tokenizer.encode(text, bos=tokenizer.add_bos_default and tokenizer.bos_id is not None))


def chat_prompt_ids(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    """A conversation in the model's chat format, ending with the assistant's turn header (images, if any, already
    as ``{"type": "image"}`` parts: see ``chat_prompt``)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it has no chat format")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
    return list(tokenizer.encode_chat(messages, add_generation_prompt=True, **kw))


def infill_prompt_ids(tokenizer: Tokenizer | None, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The fill-in-the-middle prompt whose completion is the text between `prefix` and `suffix` (Code Llama's
    ``<PRE> prefix <SUF>suffix <MID>``, or the FIM tokens a vocabulary declares)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot build an infilling prompt")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError(f"infilling takes a text prefix and suffix, got {type(prefix).__name__} and "
                         f"{type(suffix).__name__}")  # fmt: skip
    return list(tokenizer.encode_infill(prefix, suffix, suffix_first=suffix_first))


def prompt_ids(tokenizer: Tokenizer | None, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is encoded with the model's tokenizer, ids are kept."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def stop_token_ids(tokenizer: Tokenizer | None) -> set[int]:
    """The tokenizer's end-of-turn/end-of-text ids."""
    return set() if tokenizer is None else {int(i) for i in tokenizer.stop_ids}


# Images in prompts ---------------------------------------------------------------------------------------------
ImageSource = tuple[Any, str]  # (what the user gave: path, bytes, data: URI, URL, PIL image; where it was given)


def chat_prompt(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], vision: VisionAdapter | None = None,
                limits: ImageLimits | None = None, images: Sequence[Any] | None = None,
                **kw: Any) -> tuple[list[int], list[Image]]:  # fmt: skip
    """A conversation with images in the model's chat format: its prompt ids, with the model's image placeholder
    where each image part was, and the images loaded within `limits`, in order (``engine.add(ids, params,
    images=...)`` takes both). Image parts: OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` and
    HF's ``{"type": "image", "image": <path | bytes | URL | PIL image>}`` (or ``"url"``/``"path"``); a bare
    ``{"type": "image"}`` takes the next of `images`."""
    limits = limits or ImageLimits()
    ids, sources = chat_prompt_sources(tokenizer, messages, vision, limits, images, **kw)
    return ids, load_image_sources(sources, limits)


def chat_prompt_sources(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], vision: VisionAdapter | None,
                        limits: ImageLimits, images: Sequence[Any] | None = None,
                        **kw: Any) -> tuple[list[int], list[ImageSource]]:  # fmt: skip
    """``chat_prompt`` without loading the images: the prompt ids and the images' sources (checked against the
    model, the count limit and the placeholders), for a caller that loads them elsewhere (the server, off its
    event loop)."""
    plain, sources = split_image_parts(messages, images)
    if not sources:
        return chat_prompt_ids(tokenizer, plain, **kw), []
    vision = require_vision(vision)
    check_image_count(len(sources), vision, limits, "the conversation")
    ids = chat_prompt_ids(tokenizer, plain, image_token=vision.image_token, **kw)
    where = "the prompt of the chat template" + (" and the tools" if kw.get("tools") else "")  # Meta's JSON tool
    check_placeholders(ids, tokenizer, vision, len(sources), where)  # prompt rewrites the first user message as text
    return ids, sources


def image_prompt(tokenizer: Tokenizer | None, prompt: str | Sequence[int], vision: VisionAdapter | None,
                 images: Sequence[Any], limits: ImageLimits | None = None,
                 ) -> tuple[list[int], list[Image]]:  # fmt: skip
    """A completion prompt with images: its ids, with one image placeholder per image, and the images loaded.

    Text marks where each image goes with the model's image token (``llm.vision.image_token``, e.g. "<|image|>"),
    which is read as that token and nothing else in the text is; text without it gets the images in front of it
    (after BOS), one placeholder each, as Llama 3.2 Vision's base-model prompts have them. Token ids are kept."""
    vision = require_vision(vision)
    limits = limits or ImageLimits()
    check_image_count(len(images), vision, limits, "the prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        placeholder = placeholder_id(tokenizer, vision)
        pieces = prompt.split(vision.image_token)
        if len(pieces) == 1:
            pieces = [""] * len(images) + pieces
        ids = [tokenizer.bos_id] if tokenizer.add_bos_default and tokenizer.bos_id is not None else []
        for n, piece in enumerate(pieces):
            ids += ([placeholder] if n else []) + (list(tokenizer.encode(piece)) if piece else [])
    else:
        ids = prompt_ids(tokenizer, prompt)
    check_placeholders(ids, tokenizer, vision, len(images), "the prompt")
    return ids, load_images(images, limits)


def split_image_parts(messages: Any, images: Sequence[Any] | None = None) -> tuple[Any, list[ImageSource]]:
    """`messages` with every image part as ``{"type": "image"}`` (what chat templates take), and the images' sources
    in order with where each was given (``messages[0].content[1]``)."""
    if not isinstance(messages, list):
        return messages, []  # chat_prompt_ids names the problem
    spare = list(images or [])
    out: list[Any] = []
    sources: list[ImageSource] = []
    for n, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            where = f"messages[{n}].content[{j}]"
            if kind == "image_url":
                given = part.get("image_url")
                url = given.get("url") if isinstance(given, Mapping) else given
                if not isinstance(url, str):
                    raise ImageError(
                        f"{where}: an image_url part is {{'type': 'image_url', 'image_url': {{'url': ...}}}}"
                    )
                sources.append((url, f"{where}.image_url"))
            elif kind == "image":
                source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                if source is None:
                    if not spare:
                        raise ImageError(f"{where}: an image part without its image (give 'image', 'url' or 'path', or "
                                         "pass the images with images=[...])")  # fmt: skip
                    source = spare.pop(0)
                sources.append((source, where))
            else:
                parts.append(part)
                continue
            parts.append({"type": "image"})
        out.append({**m, "content": parts})
    if spare:
        raise ImageError(f"{len(spare)} more images were given than the messages have image parts for")
    return out, sources


def load_image_sources(sources: Sequence[ImageSource], limits: ImageLimits) -> list[Image]:
    """The images of ``split_image_parts``, each error naming where the image was given (and what it was)."""
    names = [f"{where} ({_short(str(s))})" if isinstance(s, (str, os.PathLike)) else where for s, where in sources]
    return load_images([s for s, _ in sources], limits, names)


def require_vision(vision: VisionAdapter | None) -> VisionAdapter:
    if vision is None:
        raise ImageError("this model takes no images (it has no vision encoder); load an image model such as Llama "
                         "3.2 Vision or Llama 4")  # fmt: skip
    return vision


def check_image_count(n: int, vision: VisionAdapter, limits: ImageLimits, where: str) -> None:
    """At most as many images as the limits allow and as the model takes per request."""
    limits.check_count(n, where)
    if n > vision.max_images:
        raise ImageError(f"{where} has {n} images; this model takes at most {vision.max_images} per request")


def placeholder_id(tokenizer: Tokenizer, vision: VisionAdapter) -> int:
    """The token id of the model's image placeholder."""
    ids = tokenizer.encode(vision.image_token, allow_special=True)
    if len(ids) != 1:
        raise ValueError(f"the image token {vision.image_token!r} is not one token of this model's tokenizer")
    return ids[0]


def check_placeholders(ids: Sequence[int], tokenizer: Tokenizer | None, vision: VisionAdapter, n: int,
                       where: str) -> None:  # fmt: skip
    """One image placeholder in `ids` per image, or an ImageError saying how many there are."""
    if tokenizer is None:
        return  # token ids without a tokenizer: the adapter counts them
    found = list(ids).count(placeholder_id(tokenizer, vision))
    if found != n:
        raise ImageError(f"{where} has {found} image placeholders ({vision.image_token}) for {n} images: give one "
                         "image per placeholder")  # fmt: skip


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[:n] + "..."
