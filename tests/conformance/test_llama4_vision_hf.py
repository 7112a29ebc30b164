"""Conformance: Llama 4's images (early fusion) against transformers' ``Llama4ForConditionalGeneration`` on a tiny
random model (the dense/MoE interleave of Maverick, a 2-layer vision encoder on 56-pixel tiles of 14-pixel patches:
4 patch tokens per tile), loaded by ``llamaforge.load`` from the directory transformers writes.

- the encoder + pixel shuffle + projector: transformers' image features, exactly;
- logits with images in the prompt (one multi-tile image with its global tile, one single-tile image): 1e-4;
- greedy generation through the engine with ``images=``: transformers' ``generate``, token for token, also when the
  prompt is prefilled in chunks that cut through the image and when image and text requests share the batch;
- prompt expansion: transformers' ``Llama4Processor._prompt_split_image``, token for token.

The pixel values come from llamaforge's processor here; ``test_llama4_image_processor.py`` compares those with
transformers' image processor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from test_llama4_hf import LAYOUTS, TEXT

import llamaforge
from llamaforge.inference import Engine, SamplingParams
from llamaforge.vision import Image
from llamaforge.vision.llama4 import Llama4Vision

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

TOL = 1e-4
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56,
              patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5, initializer_range=0.1)  # fmt: skip
# The image tokens in the tiny vocabulary, in llama-models' order after <|image_start|> (300):
START, END, TILE_X, TILE_Y, IMAGE, PATCH = 300, 301, 304, 305, 310, 312


def picture(width: int, height: int, seed: int) -> Image:
    g = torch.Generator().manual_seed(seed)
    # smooth colours plus noise: the resize's antialiasing has something to average
    base = torch.randint(0, 256, (3, 1, 1), generator=g) + torch.arange(height)[:, None] + torch.arange(width)
    noise = torch.randint(-40, 40, (3, height, width), generator=g)
    data = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    pil = PILImage.frombytes("RGB", (width, height), bytes(data.flatten().tolist()))
    return Image(pixels=pil, digest=hashlib.sha256(pil.tobytes() + bytes(str(pil.size), "ascii")).hexdigest())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[object, Path]:
    torch.manual_seed(0)
    config = transformers.Llama4Config(text_config={**TEXT, **LAYOUTS["top2"]}, vision_config=VISION,
                                       boi_token_index=START, eoi_token_index=END, image_token_index=PATCH)  # fmt: skip
    model = transformers.Llama4ForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: randomize them so their mapping counts
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("llama4-vision")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return llamaforge.load(checkpoint[1], dtype=torch.float32)


IMAGES = (picture(150, 70, seed=1), picture(40, 30, seed=2))  # 2 x 3 tiles + a global one; a single tile
PROMPT = [1, 20, 21, IMAGE, 22, 23, IMAGE, 24, 25, 26]


def hf_inputs(vision: Llama4Vision, images=IMAGES) -> torch.Tensor:
    return torch.cat([vision.pixel_values(image)[0] for image in images]).float()


def test_load_reads_the_image_side(llm) -> None:
    vision = llm.vision
    assert isinstance(vision, Llama4Vision) and vision.kind == "fusion" and vision.image_token == "<|image|>"
    t = vision.tokens
    assert (t.start, t.end, t.tile_x, t.tile_y, t.image, t.patch) == (START, END, TILE_X, TILE_Y, IMAGE, PATCH)
    assert vision.encoder.config.tokens_per_tile == 4


def test_image_features_match_transformers(checkpoint, llm) -> None:
    model, _ = checkpoint
    pixels = hf_inputs(llm.vision)
    assert pixels.shape == (8, 3, 56, 56)
    with torch.inference_mode():
        want = model.get_image_features(pixel_values=pixels).pooler_output
        got = llm.vision.encoder(pixels)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_prompt_expansion_matches_transformers_processor(llm) -> None:
    split = transformers.Llama4Processor._prompt_split_image  # a string of token names; it does not use `self`
    names = {"<|image_start|>": START, "<|image_end|>": END, "<|tile_x_separator|>": TILE_X,
             "<|tile_y_separator|>": TILE_Y, "<|image|>": IMAGE, "<|patch|>": PATCH}  # fmt: skip
    tilings = [llm.vision.pixel_values(image)[1] for image in IMAGES]
    assert tilings == [(2, 3), (1, 1)]
    expected: list[int] = []
    images = iter(tilings)
    for t in PROMPT:
        if t != IMAGE:
            expected.append(t)
            continue
        text = split(None, next(images), 4)
        for name, token in names.items():
            text = text.replace(name, f" {token} ")
        expected += [int(x) for x in text.split()]
    state = llm.vision.prepare(PROMPT, IMAGES)
    assert state.prompt_ids == expected
    assert expected.count(PATCH) == (6 + 1 + 1) * 4 and expected.count(TILE_X) == 4 and expected.count(TILE_Y) == 2
    assert state.first_position == expected.index(PATCH)
    assert state.embeddings.shape == (8 * 4, TEXT["hidden_size"])


def test_logits_with_images_match_transformers(checkpoint, llm) -> None:
    model, _ = checkpoint
    state = llm.vision.prepare(PROMPT, IMAGES)
    ids = torch.tensor([state.prompt_ids])
    with torch.inference_mode():
        want = model(input_ids=ids, pixel_values=hf_inputs(llm.vision)).logits
        pos = torch.arange(ids.shape[1])[None]
        embeds = llm.vision.forward_inputs([state], ids, pos)["input_embeds"]
        got = llm.model(ids, input_embeds=embeds)
        text_only = model(input_ids=ids).logits  # the patch tokens' own embeddings: the images must matter
    assert (want - text_only).abs().max() > 1e-2
    diff = (got - want).abs().max().item()
    assert diff < TOL, diff


def hf_greedy(model, vision: Llama4Vision, prompt: list[int], images, n: int) -> list[int]:
    ids = torch.tensor([vision.prepare(prompt, images).prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, pixel_values=hf_inputs(vision, images), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def test_greedy_generation_with_images_matches_transformers(checkpoint, llm) -> None:
    model, _ = checkpoint
    want = hf_greedy(model, llm.vision, PROMPT, IMAGES, 12)
    engine = Engine(llm, max_batch=2)
    assert engine.run([engine.add(PROMPT, GREEDY, images=list(IMAGES))])[0].token_ids == want
    # a prompt prefilled 7 tokens at a time: both images straddle chunks (the first spans 3 of them)
    chunked = Engine(llm, max_batch=2, prefill_chunk=7, prefix_caching=False)
    assert chunked.run([chunked.add(PROMPT, GREEDY, images=list(IMAGES))])[0].token_ids == want


def test_image_and_text_requests_batch_together(checkpoint, llm) -> None:
    model, _ = checkpoint
    text = [1, 30, 31, 32, 33]
    one = [1, 40, IMAGE, 41]
    with torch.inference_mode():
        want_text = model.generate(input_ids=torch.tensor([text]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False, pad_token_id=0)[0, len(text) :].tolist()  # fmt: skip
    want_image = hf_greedy(model, llm.vision, one, IMAGES[:1], 12)
    want_both = hf_greedy(model, llm.vision, PROMPT, IMAGES, 12)
    engine = Engine(llm, max_batch=4, prefill_chunk=9, prefix_caching=False)
    handles = [engine.add(text, GREEDY), engine.add(one, GREEDY, images=[IMAGES[0]]),
               engine.add(PROMPT, GREEDY, images=list(IMAGES))]  # fmt: skip
    got = [c.token_ids for c in engine.run(handles)]
    assert got == [want_text, want_image, want_both]


def test_bad_image_requests_are_refused(llm) -> None:
    engine = Engine(llm, max_batch=1)
    with pytest.raises(ValueError, match=r"1 images for 2 placeholders \(<\|image\|>\)"):
        engine.add(PROMPT, GREEDY, images=[IMAGES[0]])
    with pytest.raises(ValueError, match=r"already holds <\|patch\|> tokens"):
        engine.add([1, PATCH, IMAGE], GREEDY, images=[IMAGES[0]])
    many = [1] + [IMAGE] * (llm.vision.max_images + 1)
    with pytest.raises(ValueError, match=f"takes at most {llm.vision.max_images}"):
        engine.add(many, GREEDY, images=[IMAGES[1]] * (llm.vision.max_images + 1))


def test_prefix_reuse_keys_the_images(checkpoint, llm) -> None:
    """Two images of the same size expand to the same tokens: the cached blocks past the first patch are reused only
    for the same image, and the other image's answer is transformers' own."""
    model, _ = checkpoint
    other = picture(150, 70, seed=3)
    prompt = [1] * 32 + PROMPT + [27] * 40  # full blocks before and after the images
    engine = Engine(llm, max_batch=1)
    first = engine.run([engine.add(prompt, GREEDY, images=list(IMAGES))])[0]
    again = engine.run([engine.add(prompt, GREEDY, images=list(IMAGES))])[0]
    assert again.token_ids == first.token_ids and again.cached_tokens > 64
    swapped = engine.run([engine.add(prompt, GREEDY, images=[other, IMAGES[1]])])[0]
    assert swapped.cached_tokens <= llm.vision.prepare(prompt, [other, IMAGES[1]]).first_position
    assert swapped.token_ids == hf_greedy(model, llm.vision, prompt, [other, IMAGES[1]], 12)
