"""Conformance: Llama 4's image preprocessing (``llamaforge.vision.llama4_processor``) gives transformers'
``Llama4ImageProcessor`` pixel values (within 1e-5; both are bfloat16) and tilings, for wide, tall, tiny, huge and
exact-fit images, with a few tile counts.

transformers' Llama4 image processor needs torchvision, whose PyPI wheel for Linux is a CUDA build that cannot load
beside the CPU build of torch (``import torchvision`` fails). Where torchvision imports, the processor itself is the
reference. Everywhere, transformers' own code is run as well, without torchvision: its module's functions and the
processor's ``_preprocess`` and ``rescale_and_normalize`` methods, taken from its source file, over stand-ins for the
three torchvision primitives they call (``resize``, ``pad``, ``normalize``), written after torchvision 0.28's source
(uint8 images: antialiased bilinear ``interpolate`` in uint8 where torchvision uses its native kernel, else float32
and rounded; constant padding; normalization in the image's dtype).
"""

from __future__ import annotations

import ast
import math
import platform
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from llamaforge.vision.llama4_processor import Processor, canvases

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

# (width, height): wide, tall, tiny (upscaled), an exact tile, an exact 2 x 3 canvas, huge (downscaled), odd sizes
SIZES = [(150, 70), (70, 150), (20, 13), (56, 56), (168, 112), (900, 700), (1000, 31), (31, 1000), (113, 57), (57, 1)]
SETTINGS = [(56, 16), (56, 4), (56, 1), (28, 9)]  # (tile, max tiles)


def photo(width: int, height: int, seed: int = 0) -> PILImage.Image:
    g = torch.Generator().manual_seed(seed + width * 7 + height)
    base = torch.arange(height)[:, None, None] * 3 + torch.arange(width)[None, :, None] * 2 + torch.tensor([0, 80, 160])
    data = (base + torch.randint(-30, 30, (height, width, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    return PILImage.fromarray(data.numpy(), "RGB")


# torchvision's primitives, after torchvision 0.28 (transforms/v2/functional: resize_image, pad_image,
# normalize_image) for what the Llama 4 processor passes them.
def _tv_resize(image: torch.Tensor, size: list[int], interpolation: Any = None, antialias: bool = True) -> torch.Tensor:
    if list(image.shape[-2:]) == list(size):
        return image
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    shape = image.shape
    x = image.reshape(-1, *shape[-3:])
    x = x if native else x.float()
    out = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=antialias)
    if not native:
        out = out.round_().to(torch.uint8)
    return out.reshape(*shape[:-2], *out.shape[-2:])


def _tv_pad(image: torch.Tensor, padding: list[int], fill: Any = 0) -> torch.Tensor:
    left, top, right, bottom = padding
    fills = fill if isinstance(fill, (list, tuple)) else [fill]
    assert all(f == fills[0] for f in fills), "the Llama 4 processor pads with one colour"
    return F.pad(image, [left, right, top, bottom], value=fills[0])


def _tv_normalize(image: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub(mean_t).div_(std_t)


@lru_cache(maxsize=1)
def transformers_code() -> dict[str, Any]:
    """transformers' image_processing_llama4.py functions and the processor's two methods, run over the stand-ins."""
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_transforms import group_images_by_shape, reorder_images, split_to_tiles
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models import llama4
    from transformers.utils import TensorType

    file = Path(llama4.__file__).with_name("image_processing_llama4.py")
    tree = ast.parse(file.read_text())
    body: list[ast.stmt] = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Llama4ImageProcessor":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in ("_preprocess", "rescale_and_normalize"):
                    item.decorator_list = []
                    body.append(item)
    tvF = SimpleNamespace(resize=_tv_resize, pad=_tv_pad, normalize=_tv_normalize)
    namespace: dict[str, Any] = dict(math=math, torch=torch, defaultdict=defaultdict, lru_cache=lru_cache, tvF=tvF,
                                     SizeDict=SizeDict, BatchFeature=BatchFeature, TensorType=TensorType,
                                     PILImageResampling=PILImageResampling, group_images_by_shape=group_images_by_shape,
                                     reorder_images=reorder_images, split_to_tiles=split_to_tiles)  # fmt: skip
    exec(compile(ast.Module(body=body, type_ignores=[]), str(file), "exec"), namespace)
    assert {"_preprocess", "rescale_and_normalize", "get_best_fit", "find_supported_resolutions"} <= set(namespace)
    return namespace


def transformers_pixels(image: PILImage.Image, tile: int, max_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    from transformers.image_utils import PILImageResampling, SizeDict

    code = transformers_code()
    processor = SimpleNamespace(normalize=_tv_normalize)
    processor.resize = lambda images, size, resample=None: _tv_resize(images, [size.height, size.width])
    processor.rescale_and_normalize = lambda *args: code["rescale_and_normalize"](processor, *args)
    # as TorchvisionBackend.process_image gives it: uint8 [3, H, W]
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    out = code["_preprocess"](processor, [pixels], do_resize=True, size=SizeDict(height=tile, width=tile),
                              resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, max_patches=max_tiles,
                              resize_to_max_canvas=False, disable_grouping=None, return_tensors="pt")  # fmt: skip
    return out["pixel_values"], tuple(int(v) for v in out["aspect_ratios"][0])


@pytest.mark.parametrize("tile,max_tiles", SETTINGS)
def test_pixel_values_match_transformers_code(tile: int, max_tiles: int) -> None:
    process = Processor(tile=tile, max_tiles=max_tiles)
    for width, height in SIZES:
        image = photo(width, height)
        want, want_tiling = transformers_pixels(image, tile, max_tiles)
        got, tiling = process(image)
        assert tiling == want_tiling, (width, height)
        assert got.dtype == want.dtype == torch.bfloat16
        assert got.shape == want.shape, (width, height)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=0, msg=f"{width}x{height}")


def test_canvases_match_transformers() -> None:
    from transformers.image_utils import SizeDict

    find = transformers_code()["find_supported_resolutions"].__wrapped__
    for max_tiles in (1, 4, 9, 16):
        assert list(canvases(max_tiles, 336)) == find(max_tiles, SizeDict(height=336, width=336))


def test_transparency_goes_over_white() -> None:
    rgba = PILImage.new("RGBA", (56, 56), (10, 20, 30, 0))
    pixels, tiling = Processor(tile=56)(rgba)
    assert tiling == (1, 1) and torch.all(pixels == 1.0)  # white, normalized


def test_pixel_values_match_transformers_image_processor() -> None:
    """The reference processor itself, where torchvision can be imported."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # the CUDA wheel beside a CPU torch raises RuntimeError, not ImportError
        pytest.skip(f"torchvision cannot be imported here ({type(exc).__name__}: {exc})")
    for tile, max_tiles in SETTINGS:
        reference = transformers.Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=max_tiles)
        for width, height in SIZES:
            image = photo(width, height)
            out = reference(image, return_tensors="pt")
            got, tiling = Processor(tile=tile, max_tiles=max_tiles)(image)
            assert tiling == tuple(int(v) for v in out["aspect_ratios"][0])
            torch.testing.assert_close(got.float(), out["pixel_values"].float(), atol=1e-5, rtol=0)
