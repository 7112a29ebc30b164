"""The engine's image plumbing (``llamaforge.vision``): a request's images are prepared once, their forward inputs
reach the step, requests with and without images batch together, and prefix reuse keys the images.

The adapter (``tests/vision_testing.py``, shared with the tests of the prompts, CLI and server) is a minimal
early-fusion one over the tiny text model (each placeholder becomes two positions whose input embeddings come from
the image's pixels), so that the engine's side is tested on its own; the real adapters (Llama 4, Mllama) have
conformance tests against transformers."""

from __future__ import annotations

import pytest
from test_engine import tiny_llm
from vision_testing import PLACEHOLDER, PixelFusion, solid

from llamaforge.inference import Engine, SamplingParams
from llamaforge.llm import LLM
from llamaforge.vision import Image

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def image(colour: tuple[int, int, int]):
    return solid(colour)


@pytest.fixture
def vision_llm() -> LLM:
    llm = tiny_llm()
    llm.vision = PixelFusion(llm)
    return llm


PROMPT = [1] * 40 + [PLACEHOLDER]  # a 40-token prefix (two full 16-token blocks), then an image that ends the prompt


def run(engine: Engine, prompt: list[int], images: list[Image] | None = None) -> list[int]:
    handle = engine.add(prompt, GREEDY, images=images)
    return engine.run([handle])[0].token_ids


def test_images_change_the_answer_and_are_prepared_once(vision_llm):
    engine = Engine(vision_llm, max_batch=2, prefix_caching=False)
    red, blue = run(engine, PROMPT, [image((255, 0, 0))]), run(engine, PROMPT, [image((0, 0, 255))])
    assert red != blue
    assert run(engine, PROMPT, [image((255, 0, 0))]) == red
    assert vision_llm.vision.prepared == 3


def test_image_and_text_requests_batch_together(vision_llm):
    alone = Engine(vision_llm, max_batch=2, prefix_caching=False)
    text, pic = [5, 6, 7, 8], PROMPT
    expected = (run(alone, text), run(alone, pic, [image((0, 255, 0))]))
    both = Engine(vision_llm, max_batch=2, prefix_caching=False)
    h1, h2 = both.add(text, GREEDY), both.add(pic, GREEDY, images=[image((0, 255, 0))])
    got = both.run([h1, h2])
    assert (got[0].token_ids, got[1].token_ids) == expected


def test_prefix_reuse_keys_the_images(vision_llm):
    engine = Engine(vision_llm, max_batch=1)
    longer = PROMPT + [9] * 40  # full blocks after the image, which only the same image may reuse
    first = run(engine, longer, [image((255, 0, 0))])
    engine.add(longer, GREEDY, images=[image((255, 0, 0))])
    same = engine.run()[0]
    assert same.token_ids == first and same.cached_tokens > 48  # blocks past the image were reused
    other = engine.run([engine.add(longer, GREEDY, images=[image((0, 0, 255))])])[0]
    assert other.cached_tokens == 32  # only the two text blocks before the image
    fresh = Engine(vision_llm, max_batch=1, prefix_caching=False)
    assert other.token_ids == run(fresh, longer, [image((0, 0, 255))])


def test_bad_image_requests_are_refused(vision_llm):
    engine = Engine(vision_llm, max_batch=1)
    with pytest.raises(ValueError, match="1 images for 0 placeholders"):
        engine.add([1, 2, 3], GREEDY, images=[image((1, 2, 3))])
    with pytest.raises(ValueError, match="takes no images"):
        Engine(tiny_llm(), max_batch=1).add(PROMPT, GREEDY, images=[image((1, 2, 3))])
