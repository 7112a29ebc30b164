"""A minimal image model for the tests of the image plumbing (engine, prompts, CLI, server), so that they run without
a real vision encoder: the tiny text model, a byte-level tokenizer in the llama3 chat format with an ``<|image|>``
token, and ``PixelFusion``, an early-fusion adapter whose image embeddings are a fixed projection of the image's mean
colour. The real adapters (Llama 4, Mllama) have conformance tests against transformers.

``mllama_checkpoint`` writes a real one for the end-to-end tests: a tiny random Llama 3.2 Vision checkpoint with a
tokenizer and a chat template."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from llamaforge.config import get_preset
from llamaforge.llm import LLM
from llamaforge.model import build_model
from llamaforge.tokenizer import BaseTokenizer
from llamaforge.vision import Image, ImageState
from llamaforge.vision.inputs import load_image

BOS, EOS, HEADER_START, HEADER_END, EOT = 256, 257, 258, 259, 260
PLACEHOLDER = 300  # <|image|>
IMAGE_TOKEN = "<|image|>"


class ImageTokenizer(BaseTokenizer):
    """Bytes 0..255, Llama 3's chat specials and ``<|image|>``; the llama3 chat format."""

    def __init__(self) -> None:
        special = {"<|begin_of_text|>": BOS, "<|end_of_text|>": EOS, "<|start_header_id|>": HEADER_START,
                   "<|end_header_id|>": HEADER_END, "<|eot_id|>": EOT, IMAGE_TOKEN: PLACEHOLDER}  # fmt: skip
        super().__init__(special=special, bos_id=BOS, eos_id=EOS, vocab_size=512, chat_format="llama3")

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())

    def _ids_to_bytes(self, ids: list[int], skip_special: bool, state: dict) -> bytes:
        return b"".join(bytes([i]) if i < 256 else (b"" if skip_special else b"?") for i in ids)

    def id_to_piece(self, token_id: int) -> str:
        return chr(token_id) if token_id < 256 else "?"


@dataclass
class PixelState(ImageState):
    embeddings: Tensor | None = None  # [positions of images, dim], in prompt order


class PixelFusion:
    """Each placeholder expands to two positions, embedded as a fixed projection of the image's mean colour."""

    kind = "fusion"
    image_token = IMAGE_TOKEN
    max_images = 4

    def __init__(self, llm: LLM) -> None:
        self.model = llm.model
        self.projection = torch.randn(3, 2 * llm.config.dim, generator=torch.Generator().manual_seed(1))
        self.prepared = 0

    def prepare(self, prompt_ids: list[int], images: Sequence[Image]) -> ImageState:
        if prompt_ids.count(PLACEHOLDER) != len(images):
            raise ValueError(f"{len(images)} images for {prompt_ids.count(PLACEHOLDER)} placeholders")
        self.prepared += 1
        ids: list[int] = []
        rows = []
        for t in prompt_ids:
            ids += [t, t] if t == PLACEHOLDER else [t]
        for image in images:
            colour = torch.from_numpy(np.asarray(image.pixels, dtype=np.float32)).mean((0, 1)) / 255
            rows.append((colour @ self.projection).view(2, -1))
        return PixelState(ids, tuple(i.digest for i in images), ids.index(PLACEHOLDER), torch.cat(rows))

    def forward_inputs(self, states: Sequence[ImageState | None], tokens: Tensor, positions: Tensor) -> dict[str, Any]:
        x = self.model.tok_embeddings(tokens).clone()
        for row, state in enumerate(states):
            if state is None:
                continue
            where = [i for i, t in enumerate(state.prompt_ids) if t == PLACEHOLDER]
            for col, pos in enumerate(positions[row].tolist()):
                if pos in where:
                    x[row, col] = state.embeddings[where.index(pos)]
        return {"input_embeds": x}


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> Image:
    """A loaded image of one colour."""
    return load_image(PILImage.new("RGB", size, colour))


def vision_llm(seed: int = 0) -> LLM:
    """The tiny model with ``ImageTokenizer`` and a ``PixelFusion`` adapter."""
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny")).eval()
    llm = LLM(model=model, tokenizer=ImageTokenizer(), config=model.config, source="tiny-vision")
    llm.vision = PixelFusion(llm)
    return llm


# A real tiny image model ----------------------------------------------------------------------------------
IMAGE = 300  # Mllama's <|image|>: the first row past the text model's 300-token vocabulary
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MLLAMA_TEMPLATE = (  # Llama 3.2 Vision's template, less its tools and dates: an image part is <|image|> where it is
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|image|>' }}{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MLLAMA_VISION = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                     intermediate_size=64, vision_output_dim=96, image_size=28, patch_size=14, max_num_tiles=4,
                     intermediate_layers_indices=[3, 1])  # fmt: skip
MLLAMA_TEXT = dict(vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, cross_attention_layers=[1, 3], bos_token_id=0, eos_token_id=4, pad_token_id=0,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})  # fmt: skip


def save_mllama_tokenizer(path: Path) -> None:
    """Llama 3's chat specials, bytes and merges up to id 299, then <|image|> = 300, as Llama 3.2 Vision has it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=IMAGE, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(["What is in this picture? A red square, a blue sky and the sea."] * 8, trainer)
    reserved = IMAGE - tk.get_vocab_size()  # the merges a short corpus lacks: reserved tokens, as Llama 3 has them
    tk.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(reserved)] + ["<|image|>"])
    assert tk.token_to_id("<|image|>") == IMAGE
    tk.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
              "chat_template": MLLAMA_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def hf_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])  # fmt: skip


def mllama_checkpoint(path: Path) -> tuple[Any, Path]:
    """A tiny random transformers ``MllamaForConditionalGeneration`` (its gates randomized, so the images count)
    saved in `path` with its image processor and ``save_mllama_tokenizer``'s tokenizer: (the HF model, path)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MllamaConfig(vision_config=MLLAMA_VISION, text_config=MLLAMA_TEXT, image_token_index=IMAGE)
    model = transformers.MllamaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # zero at init
                p.normal_(0.0, 1.0)
    model.save_pretrained(path)
    hf_processor().save_pretrained(path)
    save_mllama_tokenizer(path)
    return model, path
