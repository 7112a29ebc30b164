"""Images end to end on a real tiny random image model: a transformers ``MllamaForConditionalGeneration`` (Llama 3.2
Vision) saved with ``save_pretrained`` plus a byte-level tokenizer whose ``<|image|>`` is the checkpoint's image
token and whose chat template renders image parts as Llama 3.2 Vision's does. ``llm.chat`` with image parts gives
transformers' prompt ids (``apply_chat_template``) and its greedy tokens (its own image processor and ``generate``);
``llamaforge generate --image`` run as a user runs it gives the Python API's answer (the server's ``image_url``
parts on this model: tests/serve/test_images_api.py)."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from vision_testing import IMAGE, hf_processor, mllama_checkpoint

import llamaforge

transformers = pytest.importorskip("transformers")

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[object, Path]:
    return mllama_checkpoint(tmp_path_factory.mktemp("mllama-e2e"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return llamaforge.load(checkpoint[1])


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("pictures")
    files = {}
    for name, (h, w) in {"wide": (30, 50), "tall": (70, 20)}.items():
        files[name] = out / f"{name}.png"
        PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[name])
    files["rgba"] = out / "rgba.png"  # transparency: composited onto white, as transformers does
    PILImage.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(files["rgba"])
    return files


def hf_greedy(model, ids: list[int], images: list[PILImage.Image], n: int) -> list[int]:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    features = hf_processor()(images=[images], return_tensors="pt")
    mask = get_cross_attention_token_mask(ids, IMAGE)
    dense = convert_sparse_cross_attention_mask_to_dense([mask], features["num_tiles"], 4, len(ids))
    inputs = {k: features[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), cross_attention_mask=torch.tensor(dense), **inputs,
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_chat_with_image_parts_matches_transformers(checkpoint, llm, pictures):
    model, path = checkpoint
    assert llm.vision is not None and llm.vision.image_token == "<|image|>"
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(pictures["wide"])},
        {"type": "text", "text": "What is in this picture, and in"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                            + base64.b64encode(pictures["rgba"].read_bytes()).decode()}},
        {"type": "text", "text": "?"},
    ]}]  # fmt: skip
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, messages[0]["content"][1], {"type": "image"},
                                                messages[0]["content"][3]]}]  # fmt: skip
    ids = hf_tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llamaforge.inference.chat_prompt(llm.tokenizer, messages, llm.vision)[0] == list(ids)
    images = [PILImage.open(pictures["wide"]), PILImage.open(pictures["rgba"])]
    reply = llm.chat(messages, **GREEDY)
    assert reply.token_ids == hf_greedy(model, list(ids), images, GREEDY["max_new_tokens"])
    assert "".join(llm.chat(messages, stream=True, **GREEDY)) == reply.text


def test_generate_image_from_the_cli_as_a_user_runs_it(checkpoint, llm, pictures):
    _, path = checkpoint
    cmd = [sys.executable, "-m", "llamaforge", "generate", "--model", str(path), "--image", str(pictures["tall"]),
           "-p", "What is in this picture?", "-t", "0", "-n", "6", "--no-stream", "--threads", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = llm.generate("What is in this picture?", images=[pictures["tall"]], max_new_tokens=6, temperature=0)
    assert run.stdout == expected.text + "\n"
    bad = subprocess.run([*cmd[:7], str(path / "config.json"), *cmd[8:]], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config.json: is not an image" in bad.stderr and "Traceback" not in bad.stderr
