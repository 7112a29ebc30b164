"""Images for the LLaMA family's image models: one interface for the engine, two ways a model uses an image.

- **Early fusion** (Llama 4): each image becomes a run of ``<|patch|>`` tokens in the prompt, whose input
  embeddings are the vision encoder's projected patches instead of the token table's rows.
- **Cross-attention** (Llama 3.2 Vision, Mllama): images stay out of the sequence; the language model's gated
  cross-attention layers attend to the vision encoder's output, whose keys and values are computed once per image.

A loaded image model carries ``llm.vision``, a ``VisionAdapter``. ``engine.add(prompt_ids, params, images=[...])``
asks it to ``prepare`` the request once (preprocess and encode the images, expand each image placeholder in the
prompt); the engine owns the returned ``ImageState`` with the rest of the request, and before every forward whose
batch holds an image request it asks the adapter for that forward's extra keyword arguments
(``forward_inputs``): ``input_embeds=`` for fusion, ``cross=`` for cross-attention (see ``model.py``).

Prefix caching stays exact: the engine keys the prompt position ``ImageState.first_position`` with the images'
digests, so a cached block is reused only by a prompt with the same tokens and the same images up to it.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from ..model import Transformer

# config.json model_type -> the module whose load_adapter(path, model, config) builds the VisionAdapter
ADAPTERS = {"llama4": "llamaforge.vision.llama4", "mllama": "llamaforge.vision.mllama"}


@dataclass(frozen=True)
class Image:
    """A decoded RGB image within the limits (``PIL.Image.Image`` in ``pixels``) and the sha256 of its pixels."""

    pixels: Any  # PIL.Image.Image (mode "RGB"); Any keeps Pillow out of this module's import
    digest: str


@dataclass
class ImageState:
    """What an adapter prepared for one request: the prompt with its image placeholders expanded, the images'
    digests in order, and the first prompt position whose keys and values depend on an image. Adapters subclass
    it with what they computed (patch embeddings, cross-attention keys and values)."""

    prompt_ids: list[int]
    digests: tuple[str, ...]
    first_position: int


class VisionAdapter(Protocol):
    """A model's image side, as the engine and the prompt builders use it."""

    kind: Literal["fusion", "cross"]
    image_token: str  # the placeholder for one image in a rendered prompt, e.g. "<|image|>"
    max_images: int  # per request

    def prepare(self, prompt_ids: list[int], images: Sequence[Image]) -> ImageState:
        """Preprocess and encode `images` (one per placeholder token in `prompt_ids`, in order) and expand the
        placeholders; raises ValueError naming the problem (count mismatch, too many images)."""
        ...

    def forward_inputs(self, states: Sequence[ImageState | None], tokens: Tensor, positions: Tensor) -> dict[str, Any]:
        """Extra keyword arguments of the model's cached forward for a batch (row i: tokens[i] at positions[i],
        ``states[i]`` its request's images or None)."""
        ...


def cache_keys(ids: Sequence[int], state: ImageState | None) -> list[Any]:
    """The prefix-cache keys of a request's tokens: its ids, with the position where images start to matter keyed
    by the images' digests as well (block hashes chain, so every later block differs too)."""
    keys: list[Any] = list(ids)
    if state is not None and state.first_position < len(keys):
        keys[state.first_position] = (keys[state.first_position], state.digests)
    return keys


def load_vision(path: str | os.PathLike, model: Transformer, tokenizer: Any = None,
                dtype: Any = None) -> VisionAdapter | None:  # fmt: skip
    """The image side of the checkpoint directory `path` (whose language model `model` is), or None when it has none:
    dispatched on its ``config.json`` ``model_type`` (``ADAPTERS``) to ``load_adapter(path, model, config,
    tokenizer=, dtype=)`` (`dtype`: the encoder's, default the checkpoint's)."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir() or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # the checkpoint loader has already named what is wrong with it
    module = ADAPTERS.get(config.get("model_type")) if isinstance(config, dict) else None
    if module is None:
        return None
    return importlib.import_module(module).load_adapter(path, model, config, tokenizer=tokenizer, dtype=dtype)
