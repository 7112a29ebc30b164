"""`llamaforge convert` end to end: HF -> Meta -> HF through the installed command, tokenizer included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.checkpoint import model_tensors, save_model
from llamaforge.cli import main
from llamaforge.config import ModelConfig
from llamaforge.model import build_model

COMMAND = Path(sys.executable).with_name("llamaforge")


def llama3_tokenizer():
    from llamaforge.tokenizer import load_tokenizer

    spec = pytest.importorskip("llama_models")
    path = Path(spec.__file__).parent / "llama3" / "tokenizer.model"
    return load_tokenizer(path)


def convert(*args: str) -> subprocess.CompletedProcess:
    command = [str(COMMAND)] if COMMAND.exists() else [sys.executable, "-m", "llamaforge"]
    result = subprocess.run([*command, "convert", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_hf_to_meta_to_hf(tmp_path: Path) -> None:
    tokenizer = llama3_tokenizer()
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=tokenizer.vocab_size,
                         tie_embeddings=True, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_model(model, tmp_path / "hf", "hf", tokenizer=tokenizer)

    result = convert(str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta")
    assert "wrote" in result.stderr
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    convert(str(tmp_path / "meta"), str(tmp_path / "back"), "--to", "hf", "--dtype", "bfloat16")

    back = llamaforge.load(tmp_path / "back")
    assert back.format == "hf" and back.config.tie_embeddings
    assert back.tokenizer is not None and back.tokenizer.encode("hello world") == tokenizer.encode("hello world")
    for name, tensor in model_tensors(model).items():
        assert torch.equal(model_tensors(back.model)[name], tensor.bfloat16()), name
    meta = llamaforge.load(tmp_path / "meta")
    assert meta.format == "meta" and meta.tokenizer is not None
    tokens = torch.tensor([tokenizer.encode("hello world")])
    with torch.inference_mode():
        assert torch.equal(meta.model(tokens), model(tokens))


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    save_model(build_model(llamaforge.get_preset("tiny")), tmp_path / "src", "hf")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "meta"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "meta", "--force"]) == 0
    assert not (tmp_path / "dst" / "keep.txt").exists()
    assert llamaforge.load(tmp_path / "dst").format == "meta"


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "missing" in capsys.readouterr().err


def test_convert_to_quantized_gguf(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gguf import GGMLQuantizationType as Q

    from llamaforge.checkpoint import gguf, load_model
    from llamaforge.gguf_mixes import tensor_type

    config = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=256, max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_model(model, tmp_path / "hf", "hf")
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(out), "--to", "gguf", "--quantize", "q4_k_m"]) == 0
    assert "q4_k_m" in capsys.readouterr().err
    raw = gguf.read_raw(out)
    assert all(t.qtype == tensor_type(config, n, t.shape, "q4_k_m") for n, t in raw.items())
    assert raw["layers.1.attention.wq.weight"].qtype == Q.Q4_K and raw["output.weight"].qtype == Q.Q6_K
    assert gguf.read_metadata(out)["general.file_type"] == 15
    loaded, _ = load_model(out, dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.inference_mode():
        a, b = model(tokens).flatten(), loaded(tokens).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_quantize_needs_gguf_and_no_dtype(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llamaforge.cli.convert import MIXES
    from llamaforge.gguf_mixes import MIXES as LIBRARY_MIXES

    assert tuple(LIBRARY_MIXES) == MIXES  # the CLI spells out the library's mixes (no import at start-up)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    assert main(["convert", src, out, "--to", "hf", "--quantize", "q4_k_m"]) == 2
    assert "--quantize q4_k_m writes GGUF blocks; use --to gguf" in capsys.readouterr().err
    assert main(["convert", src, out + ".gguf", "--to", "gguf", "--quantize", "q8_0", "--dtype", "float16"]) == 2
    assert "drop --dtype float16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", src, out, "--to", "gguf", "--quantize", "q4_k_x"])
    assert "invalid choice: 'q4_k_x'" in capsys.readouterr().err
