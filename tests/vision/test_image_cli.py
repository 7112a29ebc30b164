"""``llamaforge generate --image FILE`` and the chat REPL's ``/image PATH`` on the shared test image model (loaded
in-process in place of --model), compared with the Python API's answers; bad images are reported, not raised."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image as PILImage
from vision_testing import vision_llm

import llamaforge.cli.generate as cli_generate
from llamaforge.cli import main

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def images(tmp_path):
    paths = {}
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        paths[name] = tmp_path / f"{name}.png"
        PILImage.new("RGB", (5, 4), colour).save(paths[name])
    paths["text"] = tmp_path / "notes.txt"
    paths["text"].write_text("not an image")
    return paths


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process with `model` (the test image model unless changed): (exit code, stdout, stderr)."""
    monkeypatch.delenv("LLAMAFORGE_DEBUG", raising=False)
    model = {"llm": vision_llm()}
    monkeypatch.setattr(cli_generate, "load_for_cli", lambda args, model_name=None: model["llm"])

    def call(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main([*args])
        out = capsys.readouterr()
        return code, out.out, out.err

    call.model = model
    return call


def test_generate_with_images_prints_the_apis_answer(cli, images):
    code, out, err = cli("generate", "--image", str(images["red"]), "--image", str(images["blue"]), "-p", "Compare",
                         "-t", "0", "-n", "6", "--no-stream")  # fmt: skip
    assert code == 0, err
    expected = vision_llm().generate("Compare", images=[images["red"], images["blue"]], **GREEDY)
    assert out == expected.text + "\n"
    code, out, err = cli("generate", "--image", str(images["red"]), "-p", "A <|image|> here", "-t", "0", "-n", "6")
    assert code == 0 and out == vision_llm().generate("A <|image|> here", images=[images["red"]], **GREEDY).text + "\n"


@pytest.mark.parametrize(("extra", "message"), [
    (["--image", "{dir}/missing.png"], "missing.png: cannot read the file"),
    (["--image", "{text}"], "notes.txt: is not an image"),
    (["--image", "{red}", "--prompt-cache", "x.cache"], "--image does not combine with --prompt-cache"),
    (["--image", "{red}", "--suffix", "x"], "--image does not combine with --suffix"),
    (["--image", "{red}", "-p", "<|image|><|image|>"], r"has 2 image placeholders (<|image|>) for 1 images"),
])  # fmt: skip
def test_generate_reports_bad_images(cli, images, extra, message):
    fill = {"dir": images["red"].parent, "text": images["text"], "red": images["red"]}
    args = [a.format(**fill) for a in extra]
    code, _, err = cli("generate", "-p", "hi", "-t", "0", "-n", "2", *args)
    assert code == 2 and "Traceback" not in err
    assert message in err


def test_a_text_model_given_an_image_is_refused(cli, images):
    cli.model["llm"].vision = None
    code, _, err = cli("generate", "--image", str(images["red"]), "-p", "hi", "-n", "2")
    assert code == 2 and "error: this model takes no images" in err
    code, out, err = cli("chat", "-t", "0", "-n", "3", stdin=f"/image {images['red']}\nhello\n")
    assert code == 0 and "error: " in err and "takes no images" in err and out.count("\n") == 1


def test_chat_attaches_images_to_the_next_message(cli, images):
    script = f"/image {images['text']}\n/image {images['red']}\nWhat is it?\nAnd now?\n"
    code, out, err = cli("chat", "-t", "0", "-n", "6", "--seed", "0", stdin=script)
    assert code == 0, err
    assert "notes.txt: is not an image" in err and "(image 1 attached to your next message)" in err
    llm = vision_llm()
    first = [{"role": "user", "content": [{"type": "image", "image": images["red"]},
                                          {"type": "text", "text": "What is it?"}]}]  # fmt: skip
    answer = llm.chat(first, max_new_tokens=6, temperature=0).text
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
    assert out.split("\n")[:2] == [answer, llm.chat(second, max_new_tokens=6, temperature=0).text]
