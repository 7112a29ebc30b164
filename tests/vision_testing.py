"""A minimal image model for the tests of the image plumbing (engine, prompts, CLI, server), so that they run without
a real vision encoder: the tiny text model, a byte-level tokenizer in the llama3 chat format with an ``<|image|>``
token, and ``PixelFusion``, an early-fusion adapter whose image embeddings are a fixed projection of the image's mean
colour. The real adapters (Llama 4, Mllama) have conformance tests against transformers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from llamaforge.config import get_preset
from llamaforge.llm import LLM
from llamaforge.model import build_model
from llamaforge.tokenizer import BaseTokenizer
from llamaforge.vision import Image, ImageState
from llamaforge.vision.inputs import load_image

BOS, EOS, HEADER_START, HEADER_END, EOT = 256, 257, 258, 259, 260
PLACEHOLDER = 300  # <|image|>
IMAGE_TOKEN = "<|image|>"


class ImageTokenizer(BaseTokenizer):
    """Bytes 0..255, Llama 3's chat specials and ``<|image|>``; the llama3 chat format."""

    def __init__(self) -> None:
        special = {"<|begin_of_text|>": BOS, "<|end_of_text|>": EOS, "<|start_header_id|>": HEADER_START,
                   "<|end_header_id|>": HEADER_END, "<|eot_id|>": EOT, IMAGE_TOKEN: PLACEHOLDER}  # fmt: skip
        super().__init__(special=special, bos_id=BOS, eos_id=EOS, vocab_size=512, chat_format="llama3")

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict) -> bytes:
        return b"".join(bytes([i]) if i < 256 else (b"" if skip_special else b"?") for i in ids)

    def id_to_piece(self, token_id: int) -> str:
        return chr(token_id) if token_id < 256 else "?"


@dataclass
class PixelState(ImageState):
    embeddings: Tensor | None = None  # [positions of images, dim], in prompt order


class PixelFusion:
    """Each placeholder expands to two positions, embedded as a fixed projection of the image's mean colour."""

    kind = "fusion"
    image_token = IMAGE_TOKEN
    max_images = 4

    def __init__(self, llm: LLM) -> None:
        self.model = llm.model
        self.projection = torch.randn(3, 2 * llm.config.dim, generator=torch.Generator().manual_seed(1))
        self.prepared = 0

    def prepare(self, prompt_ids: list[int], images: Sequence[Image]) -> ImageState:
        if prompt_ids.count(PLACEHOLDER) != len(images):
            raise ValueError(f"{len(images)} images for {prompt_ids.count(PLACEHOLDER)} placeholders")
        self.prepared += 1
        ids: list[int] = []
        rows = []
        for t in prompt_ids:
            ids += [t, t] if t == PLACEHOLDER else [t]
        for image in images:
            colour = torch.from_numpy(np.asarray(image.pixels, dtype=np.float32)).mean((0, 1)) / 255
            rows.append((colour @ self.projection).view(2, -1))
        return PixelState(ids, tuple(i.digest for i in images), ids.index(PLACEHOLDER), torch.cat(rows))

    def forward_inputs(self, states: Sequence[ImageState | None], tokens: Tensor, positions: Tensor) -> dict[str, Any]:
        x = self.model.tok_embeddings(tokens).clone()
        for row, state in enumerate(states):
            if state is None:
                continue
            where = [i for i, t in enumerate(state.prompt_ids) if t == PLACEHOLDER]
            for col, pos in enumerate(positions[row].tolist()):
                if pos in where:
                    x[row, col] = state.embeddings[where.index(pos)]
        return {"input_embeds": x}


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> Image:
    """A loaded image of one colour."""
    return load_image(PILImage.new("RGB", size, colour))


def vision_llm(seed: int = 0) -> LLM:
    """The tiny model with ``ImageTokenizer`` and a ``PixelFusion`` adapter."""
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny")).eval()
    llm = LLM(model=model, tokenizer=ImageTokenizer(), config=model.config, source="tiny-vision")
    llm.vision = PixelFusion(llm)
    return llm
