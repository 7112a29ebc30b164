"""Llama 4's image side in pieces: the adapter's input embeddings for any mix of rows, chunks and padding, the rotary
table, the image tokens' ids, the processor settings, and loading errors that name the file and the tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file
from torch import nn

from llamaforge.errors import CheckpointError
from llamaforge.vision import Image, load_vision
from llamaforge.vision.llama4 import (
    Llama4Vision,
    VisionConfig,
    VisionEncoder,
    image_tokens,
    name_from_hf,
    pixel_shuffle,
    vision_config_from_hf,
    vision_rope,
)
from llamaforge.vision.llama4_processor import ImageTokens, Processor, image_prompt

TOKENS = ImageTokens(start=90, end=91, image=92, patch=93, tile_x=94, tile_y=95)
SMALL = VisionConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=64, image_size=28, patch_size=14, adapter_dim=24,
                     text_dim=12)  # fmt: skip


def solid(width: int, height: int, colour: tuple[int, int, int]) -> Image:
    pil = PILImage.new("RGB", (width, height), colour)
    return Image(pixels=pil, digest=hashlib.sha256(repr((width, height, colour)).encode()).hexdigest())


@pytest.fixture
def vision() -> Llama4Vision:
    torch.manual_seed(0)
    encoder = VisionEncoder(SMALL)
    for p in encoder.parameters():
        nn.init.normal_(p, std=0.2)
    return Llama4Vision(encoder, nn.Embedding(100, SMALL.text_dim), TOKENS)


def test_tokens_per_tile_and_prompt_layout() -> None:
    assert SMALL.tokens_per_tile == 1 and VisionConfig().tokens_per_tile == 144  # Scout: 336 px, 14 px, ratio 0.5
    t = TOKENS
    assert image_prompt((1, 1), 2, t) == [t.start, t.image, t.patch, t.patch, t.end]
    two_by_two = [t.start, t.patch, t.tile_x, t.patch, t.tile_y, t.patch, t.tile_x, t.patch, t.tile_y, t.image, t.patch,
                  t.end]  # fmt: skip
    assert image_prompt((2, 2), 1, t) == two_by_two


def test_input_embeddings_for_rows_chunks_and_padding(vision) -> None:
    prompt = [1, 2, TOKENS.image, 3, TOKENS.image, 4]
    images = [solid(60, 20, (200, 10, 10)), solid(10, 10, (0, 0, 250))]  # 1 x 3 tiles (+ global); one tile
    state = vision.prepare(prompt, images)
    ids = state.prompt_ids
    n = len(ids)
    patches = [i for i, t in enumerate(ids) if t == TOKENS.patch]
    assert len(patches) == (3 + 1) * 1 + 1 and state.first_position == patches[0] == 3
    whole = vision.forward_inputs([state], torch.tensor([ids]), torch.arange(n)[None])["input_embeds"][0]
    table = vision.embeddings(torch.tensor(ids))
    others = [i for i in range(n) if i not in patches]
    assert torch.equal(whole[others], table[others])
    assert torch.equal(whole[patches], state.embeddings) and not torch.allclose(whole[patches], table[patches])
    # The same prompt in chunks of 4, batched with a text row (None) and padded: the same rows wherever they land.
    for start in range(0, n, 4):
        width = 6
        chunk = ids[start : start + 4]
        tokens = torch.zeros(2, width, dtype=torch.long)
        tokens[0, : len(chunk)] = torch.tensor(chunk)
        tokens[1] = torch.tensor([5, 6, 7, 8, 9, 10])
        pos = torch.tensor([[start], [0]]) + torch.arange(width)
        x = vision.forward_inputs([state, None], tokens, pos)["input_embeds"]
        assert torch.equal(x[0, : len(chunk)], whole[start : start + len(chunk)])
        assert torch.equal(x[0, len(chunk) :], vision.embeddings(tokens[0, len(chunk) :]))  # padding: the table's
        assert torch.equal(x[1], vision.embeddings(tokens[1]))
    # A generated <|patch|> past the prompt is an ordinary token.
    late = vision.forward_inputs([state], torch.tensor([[TOKENS.patch]]), torch.tensor([[n + 3]]))["input_embeds"]
    assert torch.equal(late[0, 0], vision.embeddings.weight[TOKENS.patch])


def test_prepare_encodes_each_image_in_its_place(vision) -> None:
    red, blue = solid(10, 10, (255, 0, 0)), solid(10, 10, (0, 0, 255))
    prompt = [1, TOKENS.image, 2, TOKENS.image]
    a, b = vision.prepare(prompt, [red, blue]), vision.prepare(prompt, [blue, red])
    assert a.prompt_ids == b.prompt_ids and a.digests == (red.digest, blue.digest)
    torch.testing.assert_close(a.embeddings, b.embeddings.flip(0))  # one patch token per image here
    assert not torch.allclose(a.embeddings[0], a.embeddings[1])


def test_rotary_table() -> None:
    cos, sin = vision_rope(SMALL)
    grid, quarter = SMALL.grid, SMALL.dim // SMALL.n_heads // 4
    assert cos.shape == sin.shape == (grid * grid + 1, 1, 2 * quarter)
    assert torch.all(cos[-1] == 1) and torch.all(sin[-1] == 0)  # the class position does not turn
    angles = torch.atan2(sin[:, 0], cos[:, 0])
    # patch (row 1, column 0): its column half turns by 1 x the first frequency, its row half by 2 x
    torch.testing.assert_close(angles[grid, [0, quarter]], torch.tensor([1.0, 2.0]))


def test_pixel_shuffle_folds_neighbours() -> None:
    x = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, one channel: value = row * 4 + column
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 1].tolist() == [2, 3, 6, 7]  # 2 x 2 blocks, row-major


def test_image_tokens_come_from_the_tokenizer_or_the_config() -> None:
    data = {"boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092}
    t = image_tokens(data, None, "config.json")
    assert (t.start, t.end, t.tile_x, t.tile_y, t.image, t.patch) == (200080, 200081, 200084, 200085, 200090, 200092)

    class Vocab:
        def token_id(self, piece: str) -> int | None:
            return {"<|image|>": 7, "<|patch|>": 8}.get(piece)

    t = image_tokens(data, Vocab(), "config.json")
    assert (t.image, t.patch, t.start) == (7, 8, 200080)
    with pytest.raises(CheckpointError, match="not distinct"):
        image_tokens({"boi_token_index": 5, "image_token_index": 5}, None, "config.json")


def test_vision_config_errors_name_the_file_and_field() -> None:
    good = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=14, projector_input_dim=24, projector_output_dim=24, vision_output_dim=24)  # fmt: skip
    assert vision_config_from_hf(good, 12, "c.json") == SMALL
    with pytest.raises(CheckpointError, match=r"c\.json: vision_config lacks 'hidden_size'"):
        vision_config_from_hf({k: v for k, v in good.items() if k != "hidden_size"}, 12, "c.json")
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        vision_config_from_hf({**good, "hidden_act": "relu"}, 12, "c.json")
    with pytest.raises(CheckpointError, match="not a multiple of patch_size"):
        vision_config_from_hf({**good, "image_size": 30}, 12, "c.json")
    with pytest.raises(CheckpointError, match="intermediate_size 60"):
        vision_config_from_hf({**good, "intermediate_size": 60}, 12, "c.json")


def test_hf_names() -> None:
    assert name_from_hf("vision_model.model.layers.3.self_attn.q_proj.bias") == "layers.3.attention.wq.bias"
    assert name_from_hf("multi_modal_projector.linear_1.weight") == "projector.weight"
    assert name_from_hf("vision_model.model.layers.3.self_attn.q_norm.weight") is None


def test_processor_checks_tiles_against_the_encoder() -> None:
    with pytest.raises(ValueError, match="tiles of 56 pixels do not fit the encoder's 28"):
        Llama4Vision(VisionEncoder(SMALL), nn.Embedding(100, 12), TOKENS, Processor(tile=56))


# Loading from a checkpoint directory ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                vocab_size=128, intermediate_size=32, intermediate_size_mlp=64, moe_layers=[])  # fmt: skip
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=24, projector_input_dim=24, projector_output_dim=24)  # fmt: skip
    config = transformers.Llama4Config(text_config=text, vision_config=vision, boi_token_index=100,
                                       eoi_token_index=101, image_token_index=112)  # fmt: skip
    path = tmp_path_factory.mktemp("l4v")
    transformers.Llama4ForConditionalGeneration(config).save_pretrained(path)
    return path


def copy_with(src: Path, dst: Path, change) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_load_vision_dispatches_on_model_type(checkpoint, tmp_path) -> None:
    import llamaforge

    llm = llamaforge.load(checkpoint, dtype=torch.float32)
    assert isinstance(llm.vision, Llama4Vision) and llm.vision.encoder.config.text_dim == 32
    assert llm.vision.encoder.patch_embedding.weight.dtype == torch.float32
    assert load_vision(tmp_path, llm.model) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_vision(tmp_path, llm.model) is None


def test_unknown_missing_and_misshapen_vision_tensors_are_refused(checkpoint, tmp_path) -> None:
    import llamaforge

    model = llamaforge.load(checkpoint).model
    extra = copy_with(checkpoint, tmp_path / "extra", lambda t: t.update({"vision_model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'vision_model\.extra\.weight'"):
        load_vision(extra, model)
    missing = copy_with(checkpoint, tmp_path / "missing", lambda t: t.pop("vision_model.class_embedding"))
    with pytest.raises(CheckpointError, match="missing vision tensors class_embedding"):
        load_vision(missing, model)
    bad = copy_with(checkpoint, tmp_path / "bad",
                    lambda t: t.update({"multi_modal_projector.linear_1.weight": torch.ones(3, 3)}))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'multi_modal_projector\.linear_1\.weight' has shape \(3, 3\)"):
        load_vision(bad, model)


def test_preprocessor_config_sets_the_tiling(checkpoint, tmp_path) -> None:
    import llamaforge

    model = llamaforge.load(checkpoint).model
    path = copy_with(checkpoint, tmp_path / "p", lambda t: None)
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}, "max_patches": 4}))
    assert load_vision(path, model).processor == Processor(tile=28, max_tiles=4)
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 336, "width": 336}}))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: size .* encoder's 28 pixels"):
        load_vision(path, model)


BAD_VALUES = [None, "x", -1, 0, 10**12, 1e300, float("inf"), float("nan"), [], {}, [3, 4], True]


def test_damaged_configs_are_refused_by_name(checkpoint, tmp_path) -> None:
    """Every field of vision_config and preprocessor_config.json, and the image token indices, given a bad value:
    a CheckpointError naming the file (or a working adapter where the value is harmless), never another error."""
    import llamaforge

    model = llamaforge.load(checkpoint).model
    path = copy_with(checkpoint, tmp_path / "c", lambda t: None)
    original = json.loads((checkpoint / "config.json").read_text())
    outcomes = set()
    for field in [*(f"vision_config.{k}" for k in original["vision_config"]), "boi_token_index", "image_token_index"]:
        for value in BAD_VALUES:
            data = json.loads(json.dumps(original))
            owner, key = (data["vision_config"], field.split(".")[1]) if "." in field else (data, field)
            owner[key] = value
            (path / "config.json").write_text(json.dumps(data))
            try:
                load_vision(path, model)
                outcomes.add("loaded")
            except CheckpointError as exc:  # config.json's field, or a tensor that does not fit it
                assert str(path) in str(exc), (field, value, exc)
                outcomes.add("refused")
    (path / "config.json").write_text(json.dumps(original))
    for key in ("size", "max_patches", "image_mean", "image_std", "rescale_factor"):
        for value in BAD_VALUES:
            (path / "preprocessor_config.json").write_text(json.dumps({key: value}))
            try:
                load_vision(path, model)
            except CheckpointError as exc:
                assert "preprocessor_config.json" in str(exc), (key, value, exc)
    assert outcomes == {"loaded", "refused"}


def test_convert_notes_that_the_vision_encoder_is_not_written(checkpoint, tmp_path, capsys) -> None:
    import llamaforge
    from llamaforge.cli import main

    assert main(["convert", str(checkpoint), str(tmp_path / "text.gguf"), "--to", "gguf"]) == 0
    assert "vision encoder is not written" in capsys.readouterr().err
    converted = llamaforge.load(tmp_path / "text.gguf")
    assert converted.vision is None and converted.config.n_layers == 1
