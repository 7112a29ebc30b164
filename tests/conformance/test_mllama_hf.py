"""Conformance: a tiny random-weight transformers ``MllamaForConditionalGeneration`` (Llama 3.2 Vision), saved with
``save_pretrained`` and loaded by ``llamaforge.load``, gives the same vision states and float32 logits (1e-4) with
images in the prompt, the same greedy tokens through the engine as transformers' ``generate``, and the same tokens
for every request of a batch that mixes image requests (of different image counts) and text requests.

The gates that transformers initializes at zero (cross-attention and vision tile gates) are randomized, so every
gated path counts; images of different shapes pick different tile arrangements (1 to 4 tiles of 28 px).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file

import llamaforge
from llamaforge.errors import CheckpointError
from llamaforge.inference import Engine, SamplingParams
from llamaforge.inference.cache import PagedKVCache
from llamaforge.inference.step import select_step, unsupported_reason
from llamaforge.vision import Image

transformers = pytest.importorskip("transformers")
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

pytestmark = pytest.mark.conformance

TOL = 1e-4
IMAGE = 300  # <|image|>: the first row past the 300-token vocabulary
VISION = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_global_layers=2,
    attention_heads=4,
    intermediate_size=64,
    vision_output_dim=96,
    image_size=28,
    patch_size=14,
    max_num_tiles=4,
    intermediate_layers_indices=[3, 1],
    initializer_range=0.1,
)
TEXT = dict(vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, cross_attention_layers=[1, 3], initializer_range=0.1, bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})  # fmt: skip
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # Llama 3.2 Vision's
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def hf_mllama():
    torch.manual_seed(0)
    config = transformers.MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE)
    model = transformers.MllamaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # zero at init: randomize so the gated paths count
                p.normal_(0.0, 1.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
        model.model.multi_modal_projector.weight.mul_(3.0)  # strong enough image states to steer greedy tokens
    return model


def hf_processor() -> MllamaImageProcessorPil:
    return MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4, image_mean=MEAN,
                                   image_std=STD)  # fmt: skip


def picture(height: int, width: int, seed: int) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image(pil: PILImage.Image) -> Image:
    return Image(pil, hashlib.sha256(pil.tobytes()).hexdigest())


WIDE, TALL, SMALL = picture(30, 50, 1), picture(70, 20, 2), picture(20, 20, 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[object, Path]:
    model = hf_mllama()
    path = tmp_path_factory.mktemp("mllama")
    model.save_pretrained(path)
    hf_processor().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return llamaforge.load(checkpoint[1])


def hf_inputs(ids: list[int], pictures: list[PILImage.Image]) -> dict:
    inputs = {"input_ids": torch.tensor([ids])}
    if pictures:
        features = hf_processor()(images=[pictures], return_tensors="pt")
        mask = get_cross_attention_token_mask(ids, IMAGE)
        dense = convert_sparse_cross_attention_mask_to_dense([mask], features["num_tiles"], 4, len(ids))
        inputs |= {k: features[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        inputs["cross_attention_mask"] = torch.tensor(dense)
    return inputs


def our_logits(llm, ids: list[int], pictures: list[PILImage.Image]) -> torch.Tensor:
    cache = PagedKVCache.for_model(llm.model, 64)
    seq = cache.sequence(64)
    pos = torch.arange(len(ids))[None]
    inputs = {}
    if pictures:
        state = llm.vision.prepare(ids, [image(p) for p in pictures])
        inputs = llm.vision.forward_inputs([state], torch.tensor([ids]), pos)
    with torch.no_grad():
        return llm.model(torch.tensor([ids]), pos, cache=cache.prepare([seq], pos), **inputs)


PROMPTS = {
    "one image": ([1, 5, 6, IMAGE, 7, 8, 9, 10], [WIDE]),
    "two images": ([1, 5, IMAGE, 7, 8, 9, IMAGE, 10, 11, 12], [WIDE, TALL]),
    "consecutive images": ([1, IMAGE, IMAGE, 4, 5, IMAGE, 6], [TALL, SMALL, WIDE]),
    "image first": ([IMAGE, 1, 20, 21, 22], [SMALL]),
    "image last": ([1, IMAGE, 5, 6, 7, IMAGE], [WIDE, TALL]),  # generated tokens see the last image only
    "text only": ([1, 5, 6, 7, 8, 9], []),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_match_transformers(checkpoint, llm, case):
    model, _ = checkpoint
    ids, pictures = PROMPTS[case]
    with torch.no_grad():
        expected = model(**hf_inputs(ids, pictures)).logits
    got = our_logits(llm, ids, pictures)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_vision_encoder_matches_transformers(checkpoint, llm):
    model, _ = checkpoint
    features = hf_processor()(images=[[WIDE, TALL]], return_tensors="pt")
    with torch.no_grad():
        expected = model.model.vision_model(
            pixel_values=features["pixel_values"],
            aspect_ratio_ids=features["aspect_ratio_ids"],
            aspect_ratio_mask=features["aspect_ratio_mask"],
        ).last_hidden_state[0]
        got = llm.vision.encoder(features["pixel_values"][0], features["aspect_ratio_ids"][0],
                                 features["aspect_ratio_mask"][0])  # fmt: skip
    assert got.shape == expected.shape  # [images, tiles, patches + 1, hidden * (1 + intermediate layers)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def hf_generate(model, ids: list[int], pictures: list[PILImage.Image], n: int = 8) -> list[int]:
    with torch.no_grad():
        out = model.generate(**hf_inputs(ids, pictures), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("case", ["two images", "image last"])
def test_greedy_generation_matches_transformers(checkpoint, llm, case):
    model, _ = checkpoint
    ids, pictures = PROMPTS[case]
    expected = hf_generate(model, ids, pictures)
    assert expected != hf_generate(model, ids, pictures[::-1])  # the images (and which one is last) matter
    engine = Engine(llm, max_batch=1)
    assert engine.step_fn.name == "eager"
    handle = engine.add(ids, GREEDY, images=[image(p) for p in pictures])
    assert engine.run([handle])[0].token_ids == expected


def test_a_batch_mixes_image_and_text_requests(checkpoint, llm):
    model, _ = checkpoint
    cases = [PROMPTS["two images"], PROMPTS["text only"], PROMPTS["one image"], PROMPTS["consecutive images"]]
    expected = [hf_generate(model, ids, pictures) for ids, pictures in cases]
    scored = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)

    def run(engine: Engine, batch: list) -> list:
        handles = [engine.add(ids, scored, images=[image(p) for p in pictures] or None) for ids, pictures in batch]
        return engine.run(handles)

    together = run(Engine(llm, max_batch=4, prefix_caching=False), cases)  # rows padded to the most image keys
    assert [c.token_ids for c in together] == expected
    for case, got in zip(cases, together):
        alone = run(Engine(llm, max_batch=1, prefix_caching=False), [case])[0]
        want = torch.tensor([t.logprob for t in alone.logprobs])
        torch.testing.assert_close(torch.tensor([t.logprob for t in got.logprobs]), want, atol=1e-5, rtol=0)


def test_prefill_in_chunks_sees_the_images_at_each_position(checkpoint, llm):
    model, _ = checkpoint
    ids, pictures = [1, *range(10, 20), IMAGE, *range(20, 30), IMAGE, 5, 6], [TALL, WIDE]
    engine = Engine(llm, max_batch=2, prefill_chunk=4)  # the prompt in 7 chunks, the images' spans across them
    handle = engine.add(ids, GREEDY, images=[image(p) for p in pictures])
    assert engine.run([handle])[0].token_ids == hf_generate(model, ids, pictures)


def test_images_are_encoded_and_projected_once_per_request(llm):
    calls = {"encoder": 0, "keys": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    hooks = [llm.vision.encoder.register_forward_hook(count("encoder")),
             llm.model.layers[1].attention.wk.register_forward_hook(count("keys"))]  # fmt: skip
    try:
        engine = Engine(llm, max_batch=1, prefix_caching=False)
        ids, pictures = PROMPTS["two images"]
        engine.run([engine.add(ids, GREEDY, images=[image(p) for p in pictures])])
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"encoder": 1, "keys": 1}  # 8 decode steps reuse the image keys and values


def test_prefix_reuse_needs_the_same_images(llm):
    ids = [1, *range(10, 30), IMAGE, *range(40, 60)]  # every position attends to the image: no text-only prefix
    engine = Engine(llm, max_batch=1)
    first = engine.run([engine.add(ids, GREEDY, images=[image(WIDE)])])[0]
    again = engine.run([engine.add(ids, GREEDY, images=[image(WIDE)])])[0]
    assert again.token_ids == first.token_ids and again.cached_tokens >= 32
    other = engine.run([engine.add(ids, GREEDY, images=[image(TALL)])])[0]
    assert other.cached_tokens == 0
    fresh = Engine(llm, max_batch=1, prefix_caching=False)
    assert other.token_ids == fresh.run([fresh.add(ids, GREEDY, images=[image(TALL)])])[0].token_ids


def test_text_requests_skip_the_cross_layers(checkpoint, llm):
    model, _ = checkpoint
    ids, _ = PROMPTS["text only"]
    engine = Engine(llm, max_batch=1)
    assert engine.run([engine.add(ids, GREEDY)])[0].token_ids == hf_generate(model, ids, [])


def test_bad_image_requests_are_refused(llm):
    engine = Engine(llm, max_batch=1)
    with pytest.raises(ValueError, match=r"1 images for 2 <\|image\|> placeholders"):
        engine.add(PROMPTS["two images"][0], GREEDY, images=[image(WIDE)])
    with pytest.raises(ValueError, match="the limit is 8"):
        engine.add([1] + [IMAGE] * 9, GREEDY, images=[image(SMALL)] * 9)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([1, IMAGE + 8], GREEDY)


def test_the_kv_cache_holds_the_self_attention_layers_only(llm):
    assert PagedKVCache.for_model(llm.model, 64).n_layers == 3  # 5 layers, 2 of them cross-attention


def test_cross_layers_run_on_the_eager_step(llm):
    assert unsupported_reason(llm.model) == "gated cross-attention layers (Llama 3.2 Vision)"
    assert select_step(llm.model).name == "eager"


def _rewrite(src: Path, dst: Path, rename) -> None:
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            save_file({rename(k): v for k, v in tensors.items()}, dst / file.name, metadata={"format": "pt"})
        else:
            (dst / file.name).write_bytes(file.read_bytes())


def test_transformers5_key_layout_loads(checkpoint, llm, tmp_path):
    def v5(name: str) -> str:
        if name.startswith("language_model.model."):
            return "model.language_model." + name.removeprefix("language_model.model.")
        if name == "language_model.lm_head.weight":
            return "lm_head.weight"
        return "model." + name  # vision_model.*, multi_modal_projector.*

    _rewrite(checkpoint[1], tmp_path / "v5", v5)
    other = llamaforge.load(tmp_path / "v5")
    ids, pictures = PROMPTS["two images"]
    torch.testing.assert_close(our_logits(other, ids, pictures), our_logits(llm, ids, pictures), atol=0, rtol=0)


def test_unknown_checkpoint_keys_are_named(checkpoint, tmp_path):
    def extra_vision(name: str) -> str:
        return name.replace("vision_model.layernorm_post.bias", "vision_model.layernorm_post.beta")

    _rewrite(checkpoint[1], tmp_path / "a", extra_vision)
    with pytest.raises(CheckpointError, match=re.escape("vision_model.layernorm_post.beta")):
        llamaforge.load(tmp_path / "a")

    def self_in_cross(name: str) -> str:
        return name.replace("layers.1.cross_attn.q_proj", "layers.1.self_attn.q_proj")

    _rewrite(checkpoint[1], tmp_path / "b", self_in_cross)
    with pytest.raises(CheckpointError, match=re.escape("layers.1.self_attn.q_proj.weight")):
        llamaforge.load(tmp_path / "b")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vision_config": {**VISION, "vision_output_dim": 64}}, "vision_output_dim 64"),
        ({"vision_config": {**VISION, "hidden_act": "relu"}}, "hidden_act='relu'"),
        ({"image_token_index": 400}, "image_token_index 400"),
        ({"text_config": {**TEXT, "cross_attention_layers": [1, 9]}}, r"cross_attention_layers \[9\] outside"),
    ],
)
def test_bad_configs_are_named(checkpoint, tmp_path, change, message):
    import json

    _rewrite(checkpoint[1], tmp_path / "c", lambda name: name)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message):
        llamaforge.load(tmp_path / "c")


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_writing_an_mllama_checkpoint_is_refused(llm, tmp_path, fmt):
    from llamaforge.checkpoint import save_model

    with pytest.raises(CheckpointError, match=f"writing Llama 3.2 Vision .* as {fmt} is not supported"):
        save_model(llm.model, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()
