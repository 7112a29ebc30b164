"""Llama 4's image side (early fusion): the vision encoder, the pixel-shuffle MLP and the projector into the
language model's embedding space, and the adapter that puts the projected patches where the prompt's ``<|patch|>``
tokens are.

The encoder is a ViT over each ``tile x tile`` tile: patches cut by an unfold and embedded by one linear map, a class
embedding appended after the patches, learned positional embeddings, a pre-norm LayerNorm, pre-norm blocks (biased
attention over every position with a 2-D rotary embedding, GELU MLP), a post-norm. The class position is dropped,
the grid is pixel-shuffled (each 2 x 2 block of patches becomes one position of 4x the width, for the ratio 0.5) and
mapped by a two-layer GELU MLP, then projected to the text model's width: ``(tile / patch)^2 * ratio^2`` embeddings
per tile. Tensor names follow Meta's reference loosely; ``_HF_NAMES`` maps Hugging Face's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..model import apply_rope
from . import Image, ImageState
from .llama4_processor import MAX_TILES, MEAN, STD, ImageTokens, Processor, expand_prompt, image_prompt

MAX_IMAGES = 8  # per request: each is up to 17 tiles of patches in the prompt
_MAX_LAYERS, _MAX_GRID = 512, 256  # sanity bounds of a config.json (Scout: 34 layers, a 24 x 24 grid)
_MAX_TILES_BOUND = 64  # of preprocessor_config.json's max_patches (Llama 4: 16)


@dataclass(frozen=True)
class VisionConfig:
    """Llama 4's vision encoder (``vision_config`` of a Llama4ForConditionalGeneration config.json)."""

    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    hidden_dim: int = 5632
    image_size: int = 336  # one tile's side, in pixels
    patch_size: int = 14
    channels: int = 3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    adapter_dim: int = 4096  # the pixel-shuffle MLP's width (projector_input_dim = projector_output_dim)
    text_dim: int = 5120

    @property
    def grid(self) -> int:  # patches along a tile's side
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid**2 // round(1 / self.pixel_shuffle_ratio**2))


def vision_config_from_hf(data: Mapping[str, Any], text_dim: int, file: Path | str) -> VisionConfig:
    """Translate a Llama4VisionConfig dictionary; `file` is named in errors."""
    try:
        if data.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{file}: vision_config.hidden_act={data['hidden_act']!r} is not supported (gelu)")
        rope = data.get("rope_parameters") or {}
        config = VisionConfig(
            dim=int(data["hidden_size"]),
            n_layers=int(data["num_hidden_layers"]),
            n_heads=int(data["num_attention_heads"]),
            hidden_dim=int(data["intermediate_size"]),
            image_size=_side(data.get("image_size", 448), "image_size", file),
            patch_size=_side(data.get("patch_size", 14), "patch_size", file),
            channels=int(data.get("num_channels", 3)),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            pixel_shuffle_ratio=float(data.get("pixel_shuffle_ratio", 0.5)),
            adapter_dim=int(data.get("projector_output_dim", 4096)),
            text_dim=text_dim,
        )
    except KeyError as exc:
        raise CheckpointError(f"{file}: vision_config lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:  # int("x"), int(None), int(inf), ...
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{file}: vision_config: {exc}") from None
    c = config
    sizes = {"hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
             "intermediate_size": c.hidden_dim, "image_size": c.image_size, "patch_size": c.patch_size,
             "num_channels": c.channels, "projector_output_dim": c.adapter_dim}  # fmt: skip
    bad = [f"{key}={value}" for key, value in sizes.items() if value < 1]
    if c.channels != 3:  # the processor gives RGB
        bad.append(f"num_channels={c.channels}")
    if not 0 < c.pixel_shuffle_ratio <= 1:
        bad.append(f"pixel_shuffle_ratio={c.pixel_shuffle_ratio}")
    if bad:
        raise CheckpointError(f"{file}: vision_config: {', '.join(bad)} out of range")
    grid = c.image_size // c.patch_size
    if c.n_layers > _MAX_LAYERS or grid > _MAX_GRID:  # a damaged config must not build a giant
        raise CheckpointError(f"{file}: vision_config: {c.n_layers} layers over a {grid}-patch grid is beyond any "
                              f"Llama 4 encoder (at most {_MAX_LAYERS} layers, {_MAX_GRID} patches)")  # fmt: skip
    problems = []
    if c.image_size % c.patch_size:
        problems.append(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
    if c.dim % c.n_heads or (c.dim // c.n_heads) % 4:
        problems.append(f"hidden_size {c.dim} over {c.n_heads} heads is not a multiple of 4 per head")
    shuffled = c.dim / c.pixel_shuffle_ratio**2
    if shuffled != c.hidden_dim or (c.grid * c.pixel_shuffle_ratio) % 1:
        problems.append(f"pixel_shuffle_ratio {c.pixel_shuffle_ratio} does not turn a {c.grid}x{c.grid} grid of "
                        f"width {c.dim} into whole positions of width intermediate_size {c.hidden_dim}")  # fmt: skip
    if data.get("projector_input_dim", c.adapter_dim) != c.adapter_dim:
        problems.append("projector_input_dim differs from projector_output_dim")
    if data.get("vision_output_dim", c.adapter_dim) != c.adapter_dim:
        problems.append("vision_output_dim differs from projector_output_dim")
    if problems:
        raise CheckpointError(f"{file}: vision_config: {'; '.join(problems)}")
    return config


def _side(value: Any, key: str, file: Path | str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{file}: vision_config.{key} {value!r} is not square")
        value = value[0]
    return int(value)


# The encoder ---------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.n_heads = c.n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(c.dim, c.dim) for _ in range(4))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, -1) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class _Block(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attention = _Attention(c)
        self.ffn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.w1, self.w2 = nn.Linear(c.dim, c.hidden_dim), nn.Linear(c.hidden_dim, c.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.w2(F.gelu(self.w1(self.ffn_norm(x))))


def vision_rope(c: VisionConfig) -> tuple[Tensor, Tensor]:
    """cos/sin [positions, 1, head_dim / 2] of the 2-D rotary embedding: the first half of each head's pairs turns
    with the patch's column (counted from 1), the second half with its row; the class position (last) does not turn."""
    head_dim = c.dim // c.n_heads
    quarter = head_dim // 4
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (head_dim // 2)))
    cells = torch.arange(c.grid**2)
    col, row = (cells % c.grid + 1).float(), (cells // c.grid + 1).float()
    angles = torch.cat([col[:, None] * freqs, row[:, None] * freqs], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, 2 * quarter)])  # the class position
    return angles.cos()[:, None], angles.sin()[:, None]


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """[N, side^2, C] -> [N, (side * ratio)^2, C / ratio^2]: each block of neighbouring patches (2 x 2 for the ratio
    0.5) folded into one position's channels, blocks and the patches within them in row-major order."""
    N, P, C = x.shape
    side = math.isqrt(P)
    x = x.view(N, side, int(side * ratio), int(C / ratio))
    x = x.permute(0, 2, 1, 3).reshape(N, int(side * ratio), int(side * ratio), int(C / ratio**2))
    return x.permute(0, 2, 1, 3).reshape(N, -1, int(C / ratio**2))


class VisionEncoder(nn.Module):
    """Pixel values [tiles, 3, tile, tile] -> embeddings [tiles, tokens_per_tile, text_dim] for the language model."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Linear(c.channels * c.patch_size**2, c.dim, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.dim))
        self.positional_embedding = nn.Parameter(torch.zeros(c.grid**2 + 1, c.dim))
        self.ln_pre, self.ln_post = nn.LayerNorm(c.dim, eps=c.norm_eps), nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.adapter_w1 = nn.Linear(c.hidden_dim, c.adapter_dim, bias=False)
        self.adapter_w2 = nn.Linear(c.adapter_dim, c.adapter_dim, bias=False)
        self.projector = nn.Linear(c.adapter_dim, c.text_dim, bias=False)
        cos, sin = vision_rope(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        c = self.config
        if tuple(pixels.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"pixel values of shape {tuple(pixels.shape)}, expected [tiles, {c.channels}, "
                             f"{c.image_size}, {c.image_size}]")  # fmt: skip
        x = pixels.to(self.patch_embedding.weight.dtype)
        patches = F.unfold(x, kernel_size=c.patch_size, stride=c.patch_size).transpose(1, 2)  # [N, grid^2, 3*p*p]
        x = self.patch_embedding(patches)
        x = torch.cat([x, self.class_embedding.expand(len(x), 1, -1)], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        x = self.ln_post(x)[:, :-1]  # without the class position
        x = pixel_shuffle(x, c.pixel_shuffle_ratio)
        x = F.gelu(self.adapter_w2(F.gelu(self.adapter_w1(x))))
        return self.projector(x)


# Hugging Face's names (after "vision_model." / "multi_modal_projector.") -> ours; {i}: the layer.
_HF_NAMES = {
    "vision_model.patch_embedding.linear.weight": "patch_embedding.weight",
    "vision_model.class_embedding": "class_embedding",
    "vision_model.positional_embedding_vlm": "positional_embedding",
    "vision_model.layernorm_pre.weight": "ln_pre.weight",
    "vision_model.layernorm_pre.bias": "ln_pre.bias",
    "vision_model.layernorm_post.weight": "ln_post.weight",
    "vision_model.layernorm_post.bias": "ln_post.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "adapter_w1.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "adapter_w2.weight",
    "multi_modal_projector.linear_1.weight": "projector.weight",
}
_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.fc1": "w1",
    "mlp.fc2": "w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_LAYER = "vision_model.model.layers."


def name_from_hf(name: str) -> str | None:
    """Our name for a Hugging Face vision tensor, or None when it is not one we know."""
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    if name.startswith(_HF_LAYER):
        index, _, rest = name[len(_HF_LAYER) :].partition(".")
        module, _, kind = rest.rpartition(".")
        if index.isdigit() and module in _HF_LAYER_NAMES and kind in ("weight", "bias"):
            return f"layers.{index}.{_HF_LAYER_NAMES[module]}.{kind}"
    return None


# The adapter ---------------------------------------------------------------------------------------------------
@dataclass
class Llama4ImageState(ImageState):
    """A request's images, encoded: ``embeddings[rows[p]]`` is the input embedding of prompt position p where
    ``rows[p] >= 0`` (its ``<|patch|>`` tokens, in order)."""

    embeddings: Tensor | None = None  # [patch tokens, text dim]
    rows: Tensor | None = None  # [prompt length], long


class Llama4Vision:
    """Llama 4's early fusion for the engine (``llamaforge.vision.VisionAdapter``)."""

    kind: Literal["fusion", "cross"] = "fusion"
    image_token = "<|image|>"

    def __init__(self, encoder: VisionEncoder, embeddings: nn.Module, tokens: ImageTokens,
                 processor: Processor | None = None, max_images: int = MAX_IMAGES) -> None:  # fmt: skip
        self.encoder = encoder.eval()
        self.embeddings = embeddings  # the language model's token table
        self.tokens = tokens
        self.processor = processor or Processor(tile=encoder.config.image_size)
        self.max_images = max_images
        if self.processor.tile != encoder.config.image_size:
            raise ValueError(f"the processor's tiles of {self.processor.tile} pixels do not fit the encoder's "
                             f"{encoder.config.image_size}")  # fmt: skip

    def pixel_values(self, image: Image) -> tuple[Tensor, tuple[int, int]]:
        """The processor's tiles of one image and its tiling (rows, columns)."""
        return self.processor(image.pixels)

    @torch.inference_mode()
    def prepare(self, prompt_ids: list[int], images: Sequence[Image]) -> Llama4ImageState:
        t = self.tokens
        placeholders = prompt_ids.count(t.image)
        if len(images) != placeholders:
            raise ValueError(f"{len(images)} images for {placeholders} placeholders ({self.image_token}) in the prompt")
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images in one request; this model takes at most {self.max_images}")
        if t.patch in prompt_ids:
            raise ValueError("the prompt already holds <|patch|> tokens: give each image as one "
                             f"{self.image_token} placeholder")  # fmt: skip
        per_tile = self.encoder.config.tokens_per_tile
        tiles, expansions = [], []
        for image in images:
            pixels, tiling = self.pixel_values(image)
            tiles.append(pixels)
            expansions.append(image_prompt(tiling, per_tile, t))
        ids = expand_prompt(prompt_ids, expansions, t.image)
        weight = self.embeddings.weight
        device = weight.device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # a quantized table's activations
        embeddings = self.encoder(torch.cat(tiles).to(device)).flatten(0, 1).to(dtype)
        is_patch = torch.tensor(ids, device=device) == t.patch
        rows = torch.where(is_patch, is_patch.cumsum(0) - 1, -1)
        first = ids.index(t.patch)
        return Llama4ImageState(ids, tuple(i.digest for i in images), first, embeddings, rows)

    def forward_inputs(self, states: Sequence[ImageState | None], tokens: Tensor, positions: Tensor) -> dict[str, Any]:
        x = self.embeddings(tokens)
        for i, state in enumerate(states):
            if not isinstance(state, Llama4ImageState) or state.rows is None or state.embeddings is None:
                continue
            pos = positions[i]
            inside = pos < len(state.rows)  # prompt positions; generated tokens and padding lie past them
            rows = state.rows[pos.clamp(0, len(state.rows) - 1)]
            take = inside & (rows >= 0) & (tokens[i] == self.tokens.patch)  # not a padding column
            if take.any():
                x[i, take] = state.embeddings[rows[take]].to(x.dtype)  # x is the lookup's own new tensor
        return {"input_embeds": x}


# Loading -------------------------------------------------------------------------------------------------------
_TOKEN_NAMES = {"start": "<|image_start|>", "end": "<|image_end|>", "image": "<|image|>", "patch": "<|patch|>",
                "tile_x": "<|tile_x_separator|>", "tile_y": "<|tile_y_separator|>"}  # fmt: skip
# llama-models' tokenizer puts the vision tokens in a fixed order after <|image_start|> (200080): these offsets.
_TOKEN_OFFSETS = {"end": 1, "tile_x": 4, "tile_y": 5, "image": 10, "patch": 12}


def image_tokens(data: Mapping[str, Any], tokenizer: Any, file: Path | str) -> ImageTokens:
    """The image tokens' ids: the tokenizer's, else config.json's (``boi_token_index``, ``eoi_token_index``,
    ``image_token_index`` = ``<|patch|>``) and llama-models' fixed order for the others."""
    try:
        start = int(data.get("boi_token_index", 200080))
        found = {key: start + offset for key, offset in _TOKEN_OFFSETS.items()}
        found["start"] = start
        found["end"] = int(data.get("eoi_token_index", found["end"]))
        found["patch"] = int(data.get("image_token_index", found["patch"]))
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{file}: the image token indices: {exc}") from None
    if tokenizer is not None:
        for key, piece in _TOKEN_NAMES.items():
            token = tokenizer.token_id(piece)
            if token is not None:
                found[key] = token
    if len(set(found.values())) != len(found):
        raise CheckpointError(f"{file}: the image tokens' ids {found} are not distinct")
    return ImageTokens(**found)


def load_adapter(path: str | os.PathLike, model: nn.Module, data: dict[str, Any], tokenizer: Any = None,
                 dtype: torch.dtype | None = None) -> Llama4Vision:  # fmt: skip
    """The image side of a Llama4ForConditionalGeneration directory (`data`: its ``config.json``): its encoder
    (``vision_model.*`` and ``multi_modal_projector.*`` tensors, on the language model's device, in `dtype` or as
    stored) and its tokens and tiling (``preprocessor_config.json`` when present)."""
    from ..checkpoint.hf import CONFIG_FILE, read_prefixed

    path = Path(path)
    file = path / CONFIG_FILE
    vision = data.get("vision_config")
    if not isinstance(vision, dict):
        raise CheckpointError(f"{file}: a Llama4ForConditionalGeneration config needs a 'vision_config' object")
    config = vision_config_from_hf(vision, int(model.config.dim), file)
    with torch.device("meta"):
        encoder = VisionEncoder(config)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    device = model.tok_embeddings.weight.device
    seen = set()
    for hf_name, source, tensor in read_prefixed(path, ("vision_model.", "multi_modal_projector.")):
        name = name_from_hf(hf_name)
        if name is None or name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {hf_name!r} (not a weight of Llama 4's vision "
                                  f"encoder of {config.n_layers} layers)")  # fmt: skip
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                                  f"{expected[name]}")  # fmt: skip
        owner, _, attr = name.rpartition(".")
        module = encoder.get_submodule(owner) if owner else encoder
        setattr(module, attr, nn.Parameter(tensor.to(device, dtype or tensor.dtype), requires_grad=False))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing vision tensors {', '.join(missing[:5])}{more}")
    cos, sin = vision_rope(config)
    encoder.rope_cos, encoder.rope_sin = cos.to(device), sin.to(device)
    tokens = image_tokens(data, tokenizer, file)
    return Llama4Vision(encoder, model.tok_embeddings, tokens, _processor(path, config))


def _processor(path: Path, config: VisionConfig) -> Processor:
    """The tiling of ``preprocessor_config.json`` (transformers' Llama4ImageProcessor), else the reference's."""
    from ..checkpoint.hf import read_json

    file = path / "preprocessor_config.json"
    if not file.is_file():
        return Processor(tile=config.image_size)
    data = read_json(file, "the image processor's configuration")
    size = data.get("size") or {}
    tile = size.get("height", config.image_size) if isinstance(size, dict) else config.image_size
    if not isinstance(size, dict) or size.get("width", tile) != tile or tile != config.image_size:
        raise CheckpointError(f"{file}: size {size!r} is not square tiles of the encoder's {config.image_size} pixels")
    try:
        processor = Processor(
            tile=int(tile),
            max_tiles=int(data.get("max_patches", MAX_TILES)),
            resize_to_max_canvas=bool(data.get("resize_to_max_canvas", False)),
            rescale=float(data.get("rescale_factor", 1 / 255)),
            mean=tuple(float(v) for v in data.get("image_mean", MEAN)),
            std=tuple(float(v) for v in data.get("image_std", STD)),
        )
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    p = processor
    if not 1 <= p.max_tiles <= _MAX_TILES_BOUND:
        raise CheckpointError(f"{file}: max_patches={p.max_tiles} out of range (1 to {_MAX_TILES_BOUND})")
    if len(p.mean) != 3 or len(p.std) != 3 or not all(math.isfinite(v) and v > 0 for v in p.std):
        raise CheckpointError(f"{file}: image_mean {list(p.mean)} / image_std {list(p.std)} must be 3 values each, "
                              "the std positive")  # fmt: skip
    return processor
