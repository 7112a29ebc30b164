"""Llama 3.2 Vision's image preprocessing (``llamaforge.vision.mllama_processor``) against transformers' PIL
``MllamaImageProcessor``: the same pixel values (1e-5), aspect-ratio ids, masks and tile counts for images that pick
every kind of canvas (up- and downscaled, wide, tall, square, one tile, many), and the cross-attention token mask of
its processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from llamaforge.vision.mllama import token_tile_mask
from llamaforge.vision.mllama_processor import MllamaImageProcessor, best_canvas, supported_aspect_ratios

transformers = pytest.importorskip("transformers")
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

pytestmark = pytest.mark.conformance

SIZES = [(30, 40), (20, 100), (90, 13), (28, 28), (200, 300), (7, 7), (61, 60), (1, 500), (500, 1), (113, 57)]


@pytest.mark.parametrize("tile,tiles", [(28, 4), (56, 6), (28, 1), (28, 2)])
def test_pixels_ratio_ids_and_masks_equal_transformers(tile, tiles):
    rng = np.random.default_rng(tile + tiles)
    hf = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=tiles,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])  # fmt: skip
    ours = MllamaImageProcessor.from_dict(hf.to_dict())
    assert (ours.tile_size, ours.max_tiles) == (tile, tiles)
    for height, width in SIZES:
        pil = PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ref = hf(images=[[pil]], return_tensors="pt")
        got = ours(pil)
        torch.testing.assert_close(got.pixels, ref["pixel_values"][0, 0], atol=1e-5, rtol=0)
        assert got.aspect_ratio_id == ref["aspect_ratio_ids"][0, 0].item()
        assert got.aspect_ratio_mask.tolist() == ref["aspect_ratio_mask"][0, 0].tolist()
        assert got.num_tiles == ref["num_tiles"][0][0]


def test_grey_and_transparent_images_are_converted_to_rgb():
    hf = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    ours = MllamaImageProcessor.from_dict(hf.to_dict())
    rng = np.random.default_rng(5)
    grey = PILImage.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), mode="L")
    torch.testing.assert_close(ours(grey).pixels, torch.as_tensor(hf(images=[[grey]])["pixel_values"][0, 0]),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_canvas_choice():
    assert supported_aspect_ratios(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert best_canvas(560, 560, 4, 560) == (1, 1)  # fits exactly
    assert best_canvas(100, 1000, 4, 560) == (1, 2)  # the least upscaling (1.12x)
    assert best_canvas(3000, 3000, 4, 560) == (2, 2)  # too large for every canvas: the least downscaling


@pytest.mark.parametrize("ids", [[1, 9, 5, 6], [9, 1, 2], [1, 9, 2, 9, 3], [1, 9, 9, 2, 9, 3], [9, 9, 9], [1, 2, 9]])
def test_token_mask_equals_the_processor(ids):
    images = ids.count(9)
    tiles = [1 + i % 4 for i in range(images)]
    expected = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, 9)], [tiles], 4,
                                                            len(ids))[0]  # fmt: skip
    got = token_tile_mask(ids, 9, tiles, 4)
    assert got.view(len(ids), images, 4).tolist() == expected.astype(bool).tolist()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="do_pad=False"):
        MllamaImageProcessor.from_dict({"do_pad": False})
    with pytest.raises(ValueError, match="square"):
        MllamaImageProcessor.from_dict({"size": {"height": 560, "width": 448}})
    with pytest.raises(ValueError, match="max_image_tiles"):
        MllamaImageProcessor.from_dict({"max_image_tiles": 0})
    with pytest.raises(ValueError, match="image_mean"):
        MllamaImageProcessor.from_dict({"image_mean": [0.5, 0.5]})
