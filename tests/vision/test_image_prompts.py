"""Prompts with images (``inference.chat_prompt``, ``inference.image_prompt``) and the Python API's image calls
(``llm.generate(prompt, images=)``, ``llm.chat`` with image parts, streamed too), on the shared test image model."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image as PILImage
from vision_testing import BOS, PLACEHOLDER, ImageTokenizer, solid, vision_llm

from llamaforge.errors import ImageError
from llamaforge.inference import Engine, SamplingParams, chat_prompt, image_prompt
from llamaforge.vision.inputs import ImageLimits

GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (6, 5), colour).save(buf, "PNG")
    return buf.getvalue()


def data_uri(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(colour)).decode()


@pytest.fixture(scope="module")
def llm():
    return vision_llm()


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def expected_chat(*pieces) -> list[int]:
    """The llama3 format's ids of one user turn whose content is `pieces` (str or PLACEHOLDER)."""
    tk = ImageTokenizer()
    ids = tk.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", allow_special=True)
    for p in pieces:
        ids += [p] if p == PLACEHOLDER else tk.encode(p)
    return ids + tk.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", allow_special=True)


def test_image_parts_become_the_placeholder_where_they_are(llm, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png((255, 0, 0)))
    blue = {"type": "image_url", "image_url": {"url": data_uri((0, 0, 255))}}
    messages = user({"type": "text", "text": "Compare "}, blue, {"type": "text", "text": " with "},
                    {"type": "image", "image": str(path)})  # fmt: skip
    ids, images = chat_prompt(llm.tokenizer, messages, llm.vision)
    assert ids == expected_chat("Compare ", PLACEHOLDER, " with ", PLACEHOLDER)
    assert [i.pixels.getpixel((0, 0)) for i in images] == [(0, 0, 255), (255, 0, 0)]
    bare, given = chat_prompt(llm.tokenizer, user({"type": "image"}, {"type": "text", "text": "Hi"}), llm.vision,
                              images=[PILImage.new("RGB", (2, 2), (0, 255, 0))])  # fmt: skip
    assert bare == expected_chat(PLACEHOLDER, "Hi") and given[0].pixels.getpixel((1, 1)) == (0, 255, 0)


def test_text_only_conversations_are_unchanged(llm):
    ids, images = chat_prompt(llm.tokenizer, [{"role": "user", "content": "Hi"}], llm.vision)
    assert images == [] and ids == expected_chat("Hi")


def test_a_jinja_template_renders_image_parts_its_own_way(llm):
    tk = ImageTokenizer()
    tk.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>"
                        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")  # fmt: skip
    ids, images = chat_prompt(tk, user({"type": "image", "image": png((1, 2, 3))}, {"type": "text", "text": "x"}),
                              llm.vision)  # fmt: skip
    assert ids == [PLACEHOLDER, ord("x")] and len(images) == 1
    tk.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # a template that drops images
    with pytest.raises(ImageError, match=r"chat template has 0 image placeholders \(<\|image\|>\) for 1 images"):
        chat_prompt(tk, user({"type": "image", "image": png((1, 2, 3))}), llm.vision)


@pytest.mark.parametrize(("messages", "images", "problem"), [
    (user({"type": "image"}), None, r"messages\[0\].content\[0\]: an image part without its image"),
    (user({"type": "image_url", "image_url": {}}), None, r"an image_url part is \{'type': 'image_url'"),
    (user({"type": "text", "text": "hi"}), [png((0, 0, 0))], "1 more images were given than the messages have"),
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), None,
     r"messages\[0\].content\[0\].image_url \(data:image/png;base64,AAAA\): is not an image"),
    (user(*[{"type": "image", "image": png((0, 0, 0))}] * 3), None, "the conversation has 3 images; at most 2"),
])  # fmt: skip
def test_bad_image_parts_name_the_part(llm, messages, images, problem):
    with pytest.raises(ImageError, match=problem):
        chat_prompt(llm.tokenizer, messages, llm.vision, ImageLimits(max_images=2), images)


def test_the_models_own_image_count_limit_counts_too(llm):
    five = user(*[{"type": "image", "image": png((0, 0, 0))}] * 5)  # PixelFusion takes 4
    with pytest.raises(ImageError, match="the conversation has 5 images; this model takes at most 4 per request"):
        chat_prompt(llm.tokenizer, five, llm.vision)
    with pytest.raises(ImageError, match="the prompt has 5 images; this model takes at most 4"):
        image_prompt(llm.tokenizer, "x", llm.vision, [png((0, 0, 0))] * 5)


def test_a_text_model_refuses_images_everywhere():
    llm = vision_llm()
    llm.vision = None
    with pytest.raises(ImageError, match="this model takes no images"):
        llm.chat(user({"type": "image", "image": png((0, 0, 0))}))
    with pytest.raises(ImageError, match="this model takes no images"):
        llm.generate("Describe", images=[png((0, 0, 0))])
    assert llm.chat([{"role": "user", "content": "hi"}], **GREEDY).finish_reason == "length"


def test_image_prompt_places_the_images(llm):
    tk = llm.tokenizer
    ids, images = image_prompt(tk, "A <|image|> and <|image|>.", llm.vision, [png((1, 1, 1)), png((2, 2, 2))])
    assert ids == [BOS, *b"A ", PLACEHOLDER, *b" and ", PLACEHOLDER, ord(".")] and len(images) == 2
    front, _ = image_prompt(tk, "Describe", llm.vision, [png((1, 1, 1)), png((2, 2, 2))])
    assert front == [BOS, PLACEHOLDER, PLACEHOLDER, *b"Describe"]  # no placeholder: the images go first
    given, _ = image_prompt(tk, [BOS, PLACEHOLDER, 65], llm.vision, [png((1, 1, 1))])
    assert given == [BOS, PLACEHOLDER, 65]
    with pytest.raises(ImageError, match=r"the prompt has 1 image placeholders \(<\|image\|>\) for 2 images"):
        image_prompt(tk, "A <|image|>", llm.vision, [png((1, 1, 1)), png((2, 2, 2))])
    assert image_prompt(tk, "<|begin_of_text|>", llm.vision, [png((0, 0, 0))])[0][-7:] != [BOS]  # only <|image|>


def first_logprob(out) -> float:
    """The first generated token's logprob: the image changes it, even where the tiny model's argmax stays."""
    return out.logprobs[0].logprob


def test_generate_with_images_is_the_engines_answer(llm):
    engine = Engine(llm, max_batch=1, prefix_caching=False)
    ids = [BOS, PLACEHOLDER, *b"Describe"]
    reference = engine.run([engine.add(ids, SamplingParams(**GREEDY), images=[solid((255, 0, 0), (6, 5))])])[0]
    out = llm.generate("Describe", images=[png((255, 0, 0))], **GREEDY)
    assert out.token_ids == reference.token_ids
    assert first_logprob(llm.generate("Describe", images=[png((0, 0, 255))], logprobs=1, **GREEDY)) != first_logprob(
        llm.generate("Describe", images=[png((255, 0, 0))], logprobs=1, **GREEDY))  # fmt: skip
    streamed = "".join(llm.stream("Describe", images=[png((255, 0, 0))], **GREEDY))
    assert streamed == out.text
    with pytest.raises(ValueError, match="images go with one prompt"):
        llm.generate(["a", "b"], images=[png((0, 0, 0))])


def test_chat_with_image_parts_streamed_or_not(llm):
    messages = user({"type": "image_url", "image_url": {"url": data_uri((0, 255, 0))}}, {"type": "text", "text": "?"})
    engine = Engine(llm, max_batch=1, prefix_caching=False)
    ids = expected_chat(PLACEHOLDER, "?")
    reference = engine.run([engine.add(ids, SamplingParams(**GREEDY), images=[solid((0, 255, 0), (6, 5))])])[0]
    reply = llm.chat(messages, **GREEDY)
    assert reply.token_ids == reference.token_ids and reply.prompt_tokens == len(ids) + 1  # the image takes two
    assert "".join(llm.chat(messages, stream=True, **GREEDY)) == reply.text
    other = user({"type": "image", "image": PILImage.new("RGB", (6, 5), (9, 9, 9))}, {"type": "text", "text": "?"})
    assert first_logprob(llm.chat(other, logprobs=1, **GREEDY)) != first_logprob(
        llm.chat(messages, logprobs=1, **GREEDY)
    )


def test_a_tool_prompt_that_drops_the_image_says_so(llm):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = user({"type": "image", "image": png((1, 2, 3))}, {"type": "text", "text": "Weather?"})
    with pytest.raises(ImageError, match="the prompt of the chat template and the tools has 0 image placeholders"):
        llm.chat(messages, tools=[weather], max_new_tokens=2)  # llama3's JSON tool prompt is text only
