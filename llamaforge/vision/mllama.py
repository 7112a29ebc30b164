"""Llama 3.2 Vision (Mllama): the vision encoder, its projector, and the adapter that feeds the language model's
gated cross-attention layers (``model.CrossAttentionBlock``).

The encoder sees each image as ``max_tiles`` tiles (``mllama_processor``): a patch convolution, a class token per
tile, positional embeddings gated against tile-position embeddings chosen by the image's aspect ratio, a local
transformer over all tiles' patches, then a gated global one. Its output per patch is the global transformer's
state followed by the local transformer's states at ``intermediate_layers``; the projector maps that to the text
model's width. Module names are transformers' (``vision_model.*``, ``multi_modal_projector``) so that the
checkpoint's tensors load as stored.

The adapter (kind "cross") runs the processor, the encoder and the projector once per request, and each cross
layer's key and value projections once per request (``MllamaState``: the image keys/values cache); every forward
then only gathers them for its batch (``CrossInputs``). ``<|image|>`` stays one token in the prompt (its embedding
is a row of the token table past the vocabulary). Which images a token sees follows transformers' processor: an
image from its ``<|image|>`` to the next one (consecutive images together to the end), the last to the end of the
text, and generated tokens as the last prompt token (as ``generate`` extends the mask).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..model import CrossAttentionBlock, Transformer
from . import Image, ImageState
from .mllama_processor import MllamaImageProcessor

IMAGE_TOKEN = "<|image|>"
MAX_IMAGES = 8  # per request: each image is max_tiles x (patches + 1) keys in every cross layer
DEFAULT_KEPT = (3, 7, 15, 23, 30)  # the local encoder's layers whose outputs join the final state (11B and 90B)


# Configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """transformers' MllamaVisionConfig, as the encoder needs it."""

    dim: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    hidden_dim: int = 5120
    output_dim: int = 7680
    image_size: int = 560
    patch_size: int = 14
    max_tiles: int = 4
    intermediate_layers: tuple[int, ...] = DEFAULT_KEPT
    norm_eps: float = 1e-5
    channels: int = 3

    @property
    def num_patches(self) -> int:
        """Positions per tile: the patches and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        from .mllama_processor import supported_aspect_ratios

        return len(supported_aspect_ratios(self.max_tiles))

    @classmethod
    def from_hf(cls, data: dict[str, Any], file: str) -> VisionConfig:
        """From ``vision_config`` of an MllamaConfig; errors name the file and the field."""
        try:
            if data.get("hidden_act", "gelu") != "gelu":
                raise ValueError(f"hidden_act={data['hidden_act']!r} is not supported (Mllama uses 'gelu')")
            ratios = data.get("supported_aspect_ratios")
            tiles = int(data.get("max_num_tiles", 4))
            from .mllama_processor import supported_aspect_ratios

            if ratios is not None and [tuple(r) for r in ratios] != supported_aspect_ratios(tiles):
                raise ValueError(f"supported_aspect_ratios {ratios} are not every arrangement of at most {tiles} "
                                 "tiles in order")  # fmt: skip
            config = cls(
                dim=int(data.get("hidden_size", 1280)),
                n_layers=int(data.get("num_hidden_layers", 32)),
                n_global_layers=int(data.get("num_global_layers", 8)),
                n_heads=int(data.get("attention_heads", data.get("num_attention_heads", 16))),
                hidden_dim=int(data.get("intermediate_size", 5120)),
                output_dim=int(data.get("vision_output_dim", 7680)),
                image_size=int(data.get("image_size", 560)),
                patch_size=int(data.get("patch_size", 14)),
                max_tiles=tiles,
                intermediate_layers=tuple(int(i) for i in data.get("intermediate_layers_indices") or DEFAULT_KEPT),
                norm_eps=float(data.get("norm_eps", 1e-5)),
                channels=int(data.get("num_channels", 3)),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: vision_config: {exc}") from None
        if config.output_dim != config.dim * (1 + len(config.intermediate_layers)):
            raise CheckpointError(f"{file}: vision_config.vision_output_dim {config.output_dim} is not hidden_size "
                                  f"x (1 + {len(config.intermediate_layers)} intermediate layers)")  # fmt: skip
        bad = [i for i in config.intermediate_layers if not 0 <= i < config.n_layers]
        if bad or config.dim % config.n_heads:
            raise CheckpointError(f"{file}: vision_config: intermediate layers {bad} outside 0..{config.n_layers - 1}"
                                  if bad else f"{file}: vision_config: hidden_size {config.dim} is not divisible by "
                                  f"attention_heads {config.n_heads}")  # fmt: skip
        return config


# The encoder -------------------------------------------------------------------------------------------
class TileEmbedding(nn.Module):
    """One learned vector per tile for each aspect ratio, added to every patch of the tile (tanh-gated)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.dim = config.max_tiles, config.dim
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_tiles * config.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ratio_ids: Tensor) -> Tensor:  # x [N, tiles, P, dim]
        return x + self.gate.tanh() * self.embedding(ratio_ids).view(-1, self.max_tiles, 1, self.dim)


class PositionEmbedding(nn.Module):
    """Per-patch positions, and per (tile, patch) positions of the aspect ratio; the gate mixes the two."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.patches, self.dim = config.max_tiles, config.num_patches, config.dim
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(config.num_patches, config.dim))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                           config.max_tiles * config.num_patches * config.dim)  # fmt: skip

    def forward(self, x: Tensor, ratio_ids: Tensor) -> Tensor:  # x [N, tiles, P, dim]
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(ratio_ids).view(-1, self.max_tiles, self.patches, self.dim)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        N, L, _ = x.shape
        q, k, v = (p(x).view(N, L, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(N, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """A pre-norm transformer layer (LayerNorm, GELU MLP); the global encoder's layers gate both branches."""

    def __init__(self, config: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, n_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config, gated) for _ in range(n_layers))

    def forward(self, x: Tensor, mask: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """The last layer's output and the outputs of layers `keep`."""
        kept: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in keep]


def tile_attention_mask(ratio_mask: Tensor, patches: int, length: int) -> Tensor:
    """[N, 1, tiles * length, tiles * length] bool (True = attend) for tiles padded to `length` positions: as
    transformers and Meta's reference compute it, only a padding position (padding tile or padding patch) is kept
    from another padding position; real positions attend to every position."""
    N, tiles = ratio_mask.shape
    pad = torch.zeros(N, tiles, length, dtype=torch.bool, device=ratio_mask.device)
    pad[:] = ~ratio_mask.bool()[:, :, None]
    pad[:, :, patches:] = True
    pad = pad.view(N, tiles * length)
    return ~(pad[:, :, None] & pad[:, None, :]).unsqueeze(1)


class MllamaVisionModel(nn.Module):
    """Images [N, max_tiles, 3, H, W] -> states [N, max_tiles, patches + 1, output_dim]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv2d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.dim))
        self.gated_positional_embedding = PositionEmbedding(c)
        self.pre_tile_positional_embedding = TileEmbedding(c)
        self.post_tile_positional_embedding = TileEmbedding(c)
        self.layernorm_pre = nn.LayerNorm(c.dim)
        self.layernorm_post = nn.LayerNorm(c.dim)
        self.transformer = VisionEncoder(c, c.n_layers, gated=False)
        self.global_transformer = VisionEncoder(c, c.n_global_layers, gated=True)

    def forward(self, pixels: Tensor, ratio_ids: Tensor, ratio_mask: Tensor) -> Tensor:
        N, tiles, C, H, W = pixels.shape
        dim, P = self.config.dim, self.config.num_patches
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.reshape(N * tiles, C, H, W).to(weight.device, weight.dtype))
        x = self.pre_tile_positional_embedding(x.flatten(2).transpose(1, 2).reshape(N, tiles, P - 1, dim), ratio_ids)
        x = torch.cat([self.class_embedding.expand(N, tiles, 1, dim), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ratio_ids))
        length = P + (-P) % 8  # each tile padded to a multiple of 8 positions, as the reference does
        x = F.pad(x, (0, 0, 0, length - P)).reshape(N, tiles * length, dim)
        mask = tile_attention_mask(ratio_mask, P, length)
        x, kept = self.transformer(x, mask, keep=self.config.intermediate_layers)
        x = self.layernorm_post(x).view(N, tiles, length, dim)
        x = self.post_tile_positional_embedding(x, ratio_ids).view(N, tiles * length, dim)
        x, _ = self.global_transformer(x, mask)
        # Per patch: the global state, then the kept local states interleaved feature by feature (transformers'
        # stack(dim=-1) layout, which the projector's columns follow).
        local = torch.stack(kept, dim=-1).view(N, tiles, length, -1)
        return torch.cat([x.view(N, tiles, length, dim), local], dim=-1)[:, :, :P]


# The adapter -------------------------------------------------------------------------------------------
@dataclass
class MllamaState(ImageState):
    """A request's images, encoded once: each cross layer's keys and values over them, and the tiles each prompt
    token sees."""

    keys_values: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> [Hkv, S, D] each
    token_tiles: Tensor | None = None  # [len(prompt_ids), images * max_tiles] bool
    patches: int = 0  # keys per tile


@dataclass
class CrossInputs:
    """``model.CrossAttentionInputs`` for one forward: the batch's requests' image keys/values, padded to the
    longest, and the mask of which keys each query sees. Built per forward, keys/values gathered lazily per layer."""

    states: list[MllamaState | None]
    mask: Tensor
    row_mask: Tensor
    length: int
    _gathered: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def keys_values(self, layer: int) -> tuple[Tensor, Tensor]:
        if layer not in self._gathered:
            first = next(s for s in self.states if s is not None).keys_values[layer][0]
            Hkv, _, D = first.shape
            if len(self.states) == 1 and first.shape[1] == self.length:  # one request: no copy
                k, v = self.states[0].keys_values[layer]  # type: ignore[union-attr]
                self._gathered[layer] = (k[None], v[None])
            else:
                k = first.new_zeros(len(self.states), Hkv, self.length, D)
                v = first.new_zeros(len(self.states), Hkv, self.length, D)
                for row, state in enumerate(self.states):
                    if state is not None:
                        sk, sv = state.keys_values[layer]
                        k[row, :, : sk.shape[1]] = sk
                        v[row, :, : sv.shape[1]] = sv
                self._gathered[layer] = (k, v)
        return self._gathered[layer]


def token_tile_mask(ids: Sequence[int], image_id: int, num_tiles: Sequence[int], max_tiles: int) -> Tensor:
    """[len(ids), images * max_tiles] bool: which image tiles each token sees, as transformers' processor decides
    (``get_cross_attention_token_mask``): image i from its token to image i+1's; the last image, and a run of
    consecutive images, to the end."""
    where = [i for i, t in enumerate(ids) if t == image_id]
    ends = [*where[1:], len(ids)]
    for i in range(len(where) - 2, -1, -1):  # consecutive image tokens share the span of the run's last
        if ends[i] == where[i] + 1:
            ends[i] = ends[i + 1]
    mask = torch.zeros(len(ids), len(where) * max_tiles, dtype=torch.bool)
    for i, (start, end) in enumerate(zip(where, ends)):
        mask[start:end, i * max_tiles : i * max_tiles + num_tiles[i]] = True
    return mask


class MllamaAdapter:
    """``llamaforge.vision.VisionAdapter`` of an Mllama checkpoint."""

    kind: Literal["fusion", "cross"] = "cross"
    image_token = IMAGE_TOKEN
    max_images = MAX_IMAGES

    def __init__(self, model: Transformer, encoder: MllamaVisionModel, projector: nn.Linear,
                 processor: MllamaImageProcessor, image_token_id: int) -> None:  # fmt: skip
        self.model = model
        self.encoder = encoder
        self.projector = projector
        self.processor = processor
        self.image_token_id = image_token_id
        self.cross_layers = [layer for layer in model.layers if isinstance(layer, CrossAttentionBlock)]

    @torch.no_grad()
    def encode(self, images: Sequence[Image]) -> tuple[Tensor, list[int]]:
        """Projected vision states [images, max_tiles * patches, text dim] and each image's tile count."""
        processed = [self.processor(image.pixels) for image in images]
        device = self.projector.weight.device
        pixels = torch.stack([p.pixels for p in processed]).to(device)
        ratio_ids = torch.tensor([p.aspect_ratio_id for p in processed], device=device)
        ratio_mask = torch.stack([p.aspect_ratio_mask for p in processed]).to(device)
        states = self.projector(self.encoder(pixels, ratio_ids, ratio_mask).to(self.projector.weight.dtype))
        return states.flatten(1, 2), [p.num_tiles for p in processed]

    @torch.no_grad()
    def prepare(self, prompt_ids: list[int], images: Sequence[Image]) -> ImageState:
        count = prompt_ids.count(self.image_token_id)
        if count != len(images):
            raise ValueError(f"{len(images)} images for {count} {IMAGE_TOKEN} placeholders in the prompt: give one "
                             "image per placeholder")  # fmt: skip
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images in one request; the limit is {self.max_images}")
        states, num_tiles = self.encode(images)
        vision = states.reshape(1, -1, states.shape[-1]).to(self.model.norm.weight.dtype)  # all images, in order
        kv = {}
        for layer in self.cross_layers:
            k, v = layer.attention.image_keys_values(vision)
            kv[layer.layer_id] = (k[0], v[0])
        tiles = token_tile_mask(prompt_ids, self.image_token_id, num_tiles, self.encoder.config.max_tiles)
        # Tokens before the first image still attend to it (transformers gives a row that sees no image every key):
        # every position's keys and values depend on the images.
        return MllamaState(list(prompt_ids), tuple(i.digest for i in images), 0, kv, tiles,
                           self.encoder.config.num_patches)  # fmt: skip

    def forward_inputs(self, states: Sequence[ImageState | None], tokens: Tensor, positions: Tensor) -> dict[str, Any]:
        B, T = tokens.shape
        rows: list[MllamaState | None] = [s if isinstance(s, MllamaState) else None for s in states]
        length = max(s.token_tiles.shape[1] * s.patches for s in rows if s is not None)  # type: ignore[union-attr]
        mask = torch.ones(B, 1, T, length, dtype=torch.bool)
        row_mask = torch.zeros(B, T, 1)
        for row, state in enumerate(rows):
            if state is None:
                continue  # no image: every (zero) key and value, and row_mask 0, leave the row unchanged
            tiles = state.token_tiles
            assert tiles is not None
            # Generated tokens see what the last prompt token sees (transformers' generate repeats its row).
            at = positions[row].clamp(max=tiles.shape[0] - 1).cpu()
            seen = tiles[at].repeat_interleave(state.patches, dim=1)  # [T, S_row]
            sees_image = seen.any(-1)
            seen[~sees_image] = True  # a row that sees no image attends to all of its request's keys
            mask[row, 0, :, : seen.shape[1]] = seen
            mask[row, 0, :, seen.shape[1] :] = False
            row_mask[row, :, 0] = sees_image.float()
        device = tokens.device
        dtype = self.model.norm.weight.dtype
        cross = CrossInputs(rows, mask.to(device), row_mask.to(device, dtype), length)
        return {"cross": cross}


# Loading -----------------------------------------------------------------------------------------------
PROCESSOR_FILE = "preprocessor_config.json"


def load_adapter(path: str | Path, model: Transformer, config: dict[str, Any], tokenizer: Any = None,
                 dtype: torch.dtype | None = None) -> MllamaAdapter:  # fmt: skip
    """The adapter of the Mllama checkpoint directory `path` whose language model is `model`; `config` is its
    ``config.json``. The vision tensors load on the language model's device, in its dtype (`dtype` is not used:
    the image keys and values feed the language model's cross layers; `tokenizer` neither: ``<|image|>``'s id is in
    the config)."""
    from ..checkpoint.hf import VISION_PREFIXES, read_prefixed

    path = Path(path)
    file = str(path / "config.json")
    vision_config = config.get("vision_config")
    if not isinstance(vision_config, dict):
        raise CheckpointError(f"{file}: an Mllama config needs a 'vision_config' object")
    vc = VisionConfig.from_hf(vision_config, file)
    processor_file = path / PROCESSOR_FILE
    processor_data: dict[str, Any] = {}
    if processor_file.is_file():
        try:
            processor_data = json.loads(processor_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{processor_file}: invalid JSON ({exc})") from None
    processor_data = {"size": {"height": vc.image_size, "width": vc.image_size}, "max_image_tiles": vc.max_tiles,
                      **processor_data}  # fmt: skip
    try:
        processor = MllamaImageProcessor.from_dict(processor_data, str(processor_file))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if processor.tile_size != vc.image_size or processor.max_tiles != vc.max_tiles:
        raise CheckpointError(f"{processor_file}: tiles of {processor.tile_size} px, at most {processor.max_tiles}, "
                              f"but the encoder takes {vc.image_size} px and {vc.max_tiles}")  # fmt: skip
    text_dim = model.config.dim
    with torch.device("meta"):
        encoder = MllamaVisionModel(vc)
        projector = nn.Linear(vc.output_dim, text_dim)
    tensors = {name.removeprefix("model."): t for name, _, t in read_prefixed(path, VISION_PREFIXES)}
    expected = {f"vision_model.{k}": v for k, v in encoder.state_dict().items()}
    expected |= {f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unexpected vision tensor {unknown[0]!r} (not a weight of the Mllama vision "
                              "encoder or projector)")  # fmt: skip
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing vision tensor {missing[0]!r} ({len(missing)} missing)")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)}")  # fmt: skip
    weight = model.norm.weight
    tensors = {k: v.to(weight.device, weight.dtype) for k, v in tensors.items()}
    encoder.load_state_dict({k.removeprefix("vision_model."): v for k, v in tensors.items()
                             if k.startswith("vision_model.")}, assign=True)  # fmt: skip
    projector.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in tensors.items()
                               if k.startswith("multi_modal_projector.")}, assign=True)  # fmt: skip
    image_token_id = config.get("image_token_index", config.get("image_token_id", model.config.vocab_size))
    return MllamaAdapter(model, encoder.eval(), projector.eval(), processor, int(image_token_id))
