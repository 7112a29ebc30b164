"""Model resolution: built-in names, hub ids, the offline cache and the errors users see."""

from __future__ import annotations

import pytest

from llamaforge import hub
from llamaforge.errors import UserError


@pytest.mark.parametrize(
    ("name", "expected"),
    [("meta-llama/Llama-3.2-1B", True), ("owner/name", True), ("name", False), ("a/b/c", False), ("/abs/x", False),
     ("./x/y", False), ("owner/", False)],
)  # fmt: skip
def test_is_hub_id(name, expected):
    assert hub.is_hub_id(name) is expected


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"unknown model 'no-such-model'.*smollm2-135m-instruct"):
        hub.resolve_model("no-such-model")


def test_builtin_model_not_in_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llamaforge download smollm2-135m-instruct"):
        hub.builtin_model_path("smollm2-135m-instruct", download=False)


def test_builtin_model_found_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert hub.resolve_model("SmolLM2-135M-Instruct") == target  # names are case-insensitive


def _fake_hub_cache(root, repo_id: str, files: dict[str, str]) -> str:
    """A snapshot laid out as huggingface_hub stores it: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return str(snap)


def test_hub_download_offline_uses_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snap = _fake_hub_cache(tmp_path, "owner/model", {"config.json": "{}"})
    assert str(hub.hub_download("owner/model", offline=True)) == snap


def test_hub_download_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="owner/missing is not in the local Hugging Face cache"):
        hub.hub_download("owner/missing", offline=True)
