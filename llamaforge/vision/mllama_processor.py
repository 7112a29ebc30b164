"""Llama 3.2 Vision's image preprocessing, equal to transformers' ``MllamaImageProcessor`` (Pillow + torch).

An image is resized (bilinear, aspect ratio kept) to fit the best canvas of ``tile_size`` tiles (at most
``max_tiles`` of them: 1x1, 1x2, ..., 2x2, ...), padded with black to the canvas, scaled to [0, 1], normalized and
cut into tiles, row by row. Its tile arrangement is named by an aspect-ratio id (1-based; 0 pads a batch), and
the tiles past the arrangement's are zeros, marked out by the aspect-ratio mask.

The canvas is the one needing the least upscaling, else the least downscaling, the smaller area breaking ties
(``get_optimal_tiled_canvas`` in transformers; Meta's ``VariableSizeImageTransform``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' MllamaImageProcessor defaults, when the file states none


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) arrangement of at most `max_tiles` tiles, in transformers' order (its ids - 1)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def best_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tiles for an image of `height` x `width` pixels."""
    options = supported_aspect_ratios(max_tiles)
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in options]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    fits = [option for option, s in zip(options, scales) if s == chosen]
    return min(fits, key=lambda o: o[0] * o[1])  # the first of the smallest area, as numpy's argmin picks


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """The resized (height, width): the aspect ratio kept, within the canvas, each side at least one tile if it can."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class ProcessedImage:
    pixels: Tensor  # [max_tiles, 3, tile_size, tile_size] float32; tiles past `num_tiles` are zeros
    aspect_ratio_id: int  # 1-based index of (rows, columns) in supported_aspect_ratios(max_tiles)
    aspect_ratio_mask: Tensor  # [max_tiles] int64: 1 for the image's tiles
    num_tiles: int


@dataclass(frozen=True)
class MllamaImageProcessor:
    tile_size: int = 560
    max_tiles: int = 4
    mean: tuple[float, float, float] = IMAGENET_STANDARD
    std: tuple[float, float, float] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL.Image.Resampling.BILINEAR

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], file: str = "preprocessor_config.json") -> MllamaImageProcessor:
        """From a ``preprocessor_config.json`` object; unsupported settings are refused naming the field."""
        for key in ("do_resize", "do_pad"):
            if data.get(key, True) is not True:
                raise ValueError(f"{file}: {key}={data[key]!r} is not supported (Mllama always resizes and pads)")
        for key in ("do_rescale", "do_normalize", "do_convert_rgb"):
            if data.get(key, True) is not True:
                raise ValueError(f"{file}: {key}={data[key]!r} is not supported")
        size = data.get("size") or {"height": 560, "width": 560}
        if not isinstance(size, dict) or size.get("height") != size.get("width") or not size.get("height"):
            raise ValueError(f"{file}: size must be a square {{'height': N, 'width': N}}, got {size!r}")
        tiles = data.get("max_image_tiles", 4)
        if not isinstance(tiles, int) or tiles < 1:
            raise ValueError(f"{file}: max_image_tiles must be a positive integer, got {tiles!r}")

        def triple(key: str) -> tuple[float, float, float]:
            value = data.get(key) or IMAGENET_STANDARD
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if not isinstance(value, list | tuple) or len(value) != 3:
                raise ValueError(f"{file}: {key} must be three numbers, got {value!r}")
            return (float(value[0]), float(value[1]), float(value[2]))

        return cls(tile_size=int(size["height"]), max_tiles=tiles, mean=triple("image_mean"), std=triple("image_std"),
                   rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                   resample=int(data.get("resample", 2)))  # fmt: skip

    def __call__(self, image: Any) -> ProcessedImage:
        """Preprocess one ``PIL.Image.Image``."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        rows, cols = best_canvas(height, width, self.max_tiles, self.tile_size)
        new_h, new_w = fit_to_canvas(height, width, rows * self.tile_size, cols * self.tile_size, self.tile_size)
        resized = image.resize((new_w, new_h), resample=self.resample)
        s = self.tile_size
        canvas = torch.zeros(3, rows * s, cols * s, dtype=torch.float32)  # black padding, normalized below
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(new_h, new_w, 3)
        canvas[:, :new_h, :new_w] = pixels.permute(2, 0, 1).to(torch.float32)
        canvas = canvas * self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        canvas = (canvas - mean) / std
        tiles = canvas.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        out = torch.zeros(self.max_tiles, 3, s, s, dtype=torch.float32)
        out[: rows * cols] = tiles
        mask = torch.zeros(self.max_tiles, dtype=torch.int64)
        mask[: rows * cols] = 1
        ratio_id = supported_aspect_ratios(self.max_tiles).index((rows, cols)) + 1
        return ProcessedImage(out, ratio_id, mask, rows * cols)
