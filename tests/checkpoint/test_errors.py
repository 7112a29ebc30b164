"""Broken checkpoints fail with a CheckpointError that names the file and the problem."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamaforge.checkpoint import load_model, model_tensors, save_model
from llamaforge.config import get_preset
from llamaforge.errors import CheckpointError
from llamaforge.model import build_model


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_model(build_model(get_preset("tiny")), tmp_path / "hf", "hf")
    return tmp_path / "hf"


@pytest.fixture
def meta_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_model(build_model(get_preset("tiny")), tmp_path / "meta", "meta")
    return tmp_path / "meta"


def edit_safetensors(directory: Path, change) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def fails(path: Path, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


# Hugging Face -----------------------------------------------------------------------------------
def test_hf_missing_tensor(hf_dir: Path) -> None:
    edit_safetensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    fails(hf_dir, str(hf_dir), r"missing tensors layers\.1\.feed_forward\.w3\.weight")


def test_hf_extra_tensor(hf_dir: Path) -> None:
    edit_safetensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    fails(hf_dir, re.escape(str(hf_dir / "model.safetensors")), "unexpected tensor 'model.layers.0.self_attn.q_norm")


def test_hf_extra_layer(hf_dir: Path) -> None:
    edit_safetensors(hf_dir, lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}))
    fails(hf_dir, str(hf_dir), r"unexpected tensor 'layers\.2\.attention_norm\.weight' for a 2-layer model")


def test_hf_wrong_shape(hf_dir: Path) -> None:
    edit_safetensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}))
    fails(hf_dir, str(hf_dir), r"layers\.0\.attention\.wk\.weight' has shape \(48, 64\), expected \(32, 64\)")


def test_hf_wrong_config_for_weights(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, r"feed_forward\.w[123]\.weight' has shape \((160, 64|64, 160)\), expected")


def test_hf_unknown_architecture(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, re.escape(str(hf_dir / "config.json")), "unsupported architecture.*GPT2LMHeadModel")


def test_hf_truncated_safetensors(hf_dir: Path) -> None:
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    fails(hf_dir, re.escape(str(file)), "truncated")


def test_hf_garbage_header(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    fails(hf_dir, re.escape(str(hf_dir / "model.safetensors")), "not a readable safetensors file")


def test_hf_missing_config(hf_dir: Path) -> None:
    (hf_dir / "config.json").unlink()
    fails(hf_dir, str(hf_dir), "missing config.json")


def test_hf_bad_json(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text('{"hidden_size": 64,\n "num_hidden_layers": }')
    fails(hf_dir, re.escape(str(hf_dir / "config.json")), "invalid JSON.*line 2 column")


def test_hf_missing_field(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    del config["num_attention_heads"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, re.escape(str(hf_dir / "config.json")), "missing field 'num_attention_heads'")


def test_hf_invalid_config_values(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, re.escape(str(hf_dir / "config.json")), r"n_kv_heads \(3\) must divide n_heads \(4\)")


def test_hf_index_names_missing_shard(hf_dir: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(hf_dir, "model.safetensors.index.json", "model-00002-of-00002.safetensors, which is missing")


def test_hf_only_pickled_weights(tmp_path: Path, hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"")
    fails(hf_dir, "no \\*.safetensors weight files.*pytorch_model.bin")


# Meta --------------------------------------------------------------------------------------------
class NotATensor:
    pass


def test_meta_pickled_objects_refused(meta_dir: Path) -> None:
    file = meta_dir / "consolidated.00.pth"
    state = torch.load(file, weights_only=True)
    state["evil"] = NotATensor()
    torch.save(state, file)
    message = fails(meta_dir, re.escape(str(file)), "objects other than tensors")
    assert "Traceback" not in message and len(message) < 600


def test_meta_plain_pickle_refused(meta_dir: Path) -> None:
    file = meta_dir / "consolidated.00.pth"
    file.write_bytes(pickle.dumps({"x": NotATensor()}))
    fails(meta_dir, re.escape(str(file)))


def test_meta_truncated_pth(meta_dir: Path) -> None:
    file = meta_dir / "consolidated.00.pth"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])
    fails(meta_dir, re.escape(str(file)), "not a readable PyTorch checkpoint")


def test_meta_missing_params(meta_dir: Path) -> None:
    (meta_dir / "params.json").unlink()
    fails(meta_dir, str(meta_dir), "missing params.json")


def test_meta_bad_json(meta_dir: Path) -> None:
    (meta_dir / "params.json").write_text("{'dim': 64}")
    fails(meta_dir, re.escape(str(meta_dir / "params.json")), "invalid JSON")


def test_meta_missing_tensor(meta_dir: Path) -> None:
    file = meta_dir / "consolidated.00.pth"
    state = torch.load(file, weights_only=True)
    del state["layers.0.ffn_norm.weight"]
    torch.save(state, file)
    fails(meta_dir, str(meta_dir), r"missing tensors layers\.0\.ffn_norm\.weight")


def test_meta_extra_tensor(meta_dir: Path) -> None:
    file = meta_dir / "consolidated.00.pth"
    state = torch.load(file, weights_only=True)
    state["layers.0.attention.bias"] = torch.zeros(64)
    torch.save(state, file)
    fails(meta_dir, str(meta_dir), r"unexpected tensor 'layers\.0\.attention\.bias'")


def test_meta_wrong_shape(meta_dir: Path) -> None:
    params = json.loads((meta_dir / "params.json").read_text())
    params["dim"] = 32
    del params["hidden_dim"]
    (meta_dir / "params.json").write_text(json.dumps(params))
    fails(meta_dir, str(meta_dir), "has shape")


def test_meta_shard_missing_a_tensor(meta_dir: Path) -> None:
    state = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    del state["tok_embeddings.weight"]
    torch.save(state, meta_dir / "consolidated.01.pth")
    fails(meta_dir, re.escape(str(meta_dir / "consolidated.01.pth")), "missing tensor 'tok_embeddings.weight'")


# General -----------------------------------------------------------------------------------------
def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    fails(tmp_path, str(tmp_path), "not a checkpoint llamaforge can read")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "nope")


def test_cli_prints_one_line_not_a_traceback(hf_dir: Path, tmp_path: Path) -> None:
    edit_safetensors(hf_dir, lambda t: t.pop("model.norm.weight"))
    result = subprocess.run([sys.executable, "-m", "llamaforge", "convert", str(hf_dir), str(tmp_path / "out"),
                             "--to", "meta"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing tensors norm.weight" in result.stderr and str(hf_dir) in result.stderr
    assert not (tmp_path / "out").exists()


def test_writers_refuse_incomplete_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    from llamaforge.checkpoint import hf, meta

    tensors = model_tensors(model)
    del tensors["norm.weight"]
    for module in (hf, meta):
        with pytest.raises(CheckpointError, match=r"missing tensors \['norm\.weight'\]"):
            module.write(tmp_path / module.__name__, model.config, tensors)
