"""Llama 4's image preprocessing and prompt expansion, as its reference processor does them.

An image is resized, without distortion, onto the best-fitting canvas of whole tiles (at most ``max_tiles`` tiles
of ``tile x tile`` pixels, rows x columns), padded with black on the right and bottom, cut into tiles in row-major
order and normalized; when there is more than one tile, the whole image squeezed into a single tile (the global
tile) comes last. The canvas is the one that needs the least upscaling, or else the least downscaling, and among
equal scales the smallest; an image is upscaled only up to one tile's side.

Normalization runs in bfloat16 as Meta's and transformers' processors do: the pixel values are bfloat16 numbers.

In the prompt, each ``<|image|>`` placeholder becomes ``<|image_start|>``, each tile's run of ``<|patch|>`` tokens
(with ``<|tile_x_separator|>`` between the tiles of a row and ``<|tile_y_separator|>`` after each row), then
``<|image|>`` and the global tile's run, and ``<|image_end|>``; a single-tile image is just ``<|image_start|>
<|image|>`` its run ``<|image_end|>``.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_TILES = 16  # the reference processor's ``max_patches``
MEAN = STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageTokens:
    """The ids of Llama 4's image tokens (``<|image_start|>``, ... in llama-models' tokenizer)."""

    start: int
    end: int
    image: int  # the placeholder a prompt holds, which also precedes the global tile
    patch: int
    tile_x: int
    tile_y: int


@dataclass(frozen=True)
class Processor:
    """Llama 4's image preprocessing: tiles of `tile` pixels, at most `max_tiles` of them (without the global one)."""

    tile: int = 336
    max_tiles: int = MAX_TILES
    resize_to_max_canvas: bool = False
    rescale: float = 1 / 255
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __call__(self, image: Any) -> tuple[Tensor, tuple[int, int]]:
        """Pixel values [tiles, 3, tile, tile] (bfloat16; the global tile last when there are several) and the
        tiling (rows, columns) of a PIL image."""
        pixels = _to_tensor(image)
        height, width = pixels.shape[-2:]
        canvas = best_canvas((height, width), self.max_tiles, self.tile, self.resize_to_max_canvas)
        bound = canvas
        if not self.resize_to_max_canvas:  # upscale no further than one tile's side
            bound = (min(max(height, self.tile), canvas[0]), min(max(width, self.tile), canvas[1]))
        size = fit_without_distortion((height, width), bound)
        resized = _resize(pixels, (max(size[0], 1), max(size[1], 1)))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[-1], 0, canvas[0] - resized.shape[-2]))  # black
        rows, cols = canvas[0] // self.tile, canvas[1] // self.tile
        tiles = self._normalize(padded).view(3, rows, self.tile, cols, self.tile)
        tiles = tiles.permute(1, 3, 0, 2, 4).reshape(-1, 3, self.tile, self.tile)  # row-major tiles
        if rows * cols > 1:
            whole = self._normalize(_resize(pixels, (self.tile, self.tile)))
            tiles = torch.cat([tiles, whole[None]])
        return tiles, (rows, cols)

    def _normalize(self, pixels: Tensor) -> Tensor:
        # In bfloat16, rounding after each operation, as the reference does.
        x = pixels.to(torch.bfloat16) * self.rescale
        mean = torch.tensor(self.mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.bfloat16).view(-1, 1, 1)
        return (x - mean) / std


def _to_tensor(image: Any) -> Tensor:
    """uint8 [3, H, W] of a PIL image, converted to RGB (transparency over white, as the reference does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        from PIL import Image as PILImage

        image = image.convert("RGBA")
        image = PILImage.alpha_composite(PILImage.new("RGBA", image.size, (255, 255, 255, 255)), image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).contiguous()


def _resize(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of uint8 [3, H, W], as the reference's (torchvision's) resize of uint8 images: in
    uint8 where the CPU has a native uint8 kernel (AVX2, AVX-512, ARM), else in float32 and rounded."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    x = pixels[None] if native else pixels[None].float()
    out = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out if native else out.round().to(torch.uint8)


@lru_cache(maxsize=8)
def canvases(max_tiles: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) of at most `max_tiles` whole tiles, grouped by aspect ratio in the reference's order
    (which decides between canvases of equal scale and area)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return tuple((rows * tile, cols * tile) for group in by_ratio.values() for rows, cols in group)


def best_canvas(size: tuple[int, int], max_tiles: int, tile: int, to_max: bool = False) -> tuple[int, int]:
    """The canvas an image of `size` (height, width) goes on: the smallest upscale (the largest with `to_max`),
    else the smallest downscale; the smallest area among equals."""
    options = torch.tensor(canvases(max_tiles, tile))
    # float32 division, as the reference computes it: equal scales must compare equal the same way
    scales = torch.minimum(options[:, 0] / size[0], options[:, 1] / size[1])
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if to_max else up.min()
    else:
        chosen = scales[scales < 1].max()
    fitting = options[scales == chosen]
    best = fitting[torch.argmin(fitting[:, 0] * fitting[:, 1])]
    return int(best[0]), int(best[1])


def fit_without_distortion(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) with the aspect ratio of `size` that fits in `bound`."""
    height, width = size
    scale_h, scale_w = bound[0] / height, bound[1] / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), bound[0]), bound[1]
    return bound[0], min(math.floor(width * scale_h), bound[1])


def image_prompt(tiling: tuple[int, int], per_tile: int, ids: ImageTokens) -> list[int]:
    """The tokens one image stands for in the prompt: `tiling` (rows, columns) of `per_tile` patch tokens each."""
    rows, cols = tiling
    out = [ids.start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [ids.patch] * per_tile
                if x < cols - 1:
                    out.append(ids.tile_x)
            out.append(ids.tile_y)
    return out + [ids.image] + [ids.patch] * per_tile + [ids.end]


def expand_prompt(prompt_ids: Sequence[int], expansions: Sequence[list[int]], placeholder: int) -> list[int]:
    """`prompt_ids` with its `placeholder` tokens replaced by `expansions`, in order."""
    out: list[int] = []
    images = iter(expansions)
    for t in prompt_ids:
        if t == placeholder:
            out += next(images)
        else:
            out.append(t)
    return out
