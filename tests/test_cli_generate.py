"""The `download`, `generate` and `chat` verbs end to end on a tiny model saved to disk: a few runs in
subprocesses (the real command, no traceback), the rest through ``llamaforge.cli.main`` in-process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint import save_model
from llamaforge.cli import main
from llamaforge.config import get_preset
from llamaforge.model import build_model

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog", "user assistant system chat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model in Hugging Face format with a byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(CORPUS * 10, trainer)
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    save_model(build_model(get_preset("tiny", vocab_size=tk.get_vocab_size())), path, "hf")
    tk.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("LLAMAFORGE_DEBUG", None)
    cmd = [sys.executable, "-m", "llamaforge", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("LLAMAFORGE_DEBUG", raising=False)

    def call(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main([*args])
        out = capsys.readouterr()
        return code, out.out, out.err

    yield call
    torch.set_num_threads(threads)


def gen_args(model_dir: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--threads", "1", *extra]


def test_generate_command_in_a_subprocess(model_dir, cli):
    result = run(*gen_args(model_dir, "--prompt", "hello world", "-n", "12", "-t", "0"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    code, out, _ = cli(*gen_args(model_dir, "--prompt", "hello world", "-n", "12", "-t", "0"))
    assert code == 0 and out == result.stdout and out.strip()


def test_unknown_model_in_a_subprocess_has_no_traceback():
    result = run("generate", "--model", "no-such-model", "--prompt", "hi")
    assert result.returncode == 2
    assert "llamaforge generate: error: unknown model 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_stream_and_logprobs(model_dir, cli):
    common = gen_args(model_dir, "--prompt", "hello world", "-n", "12", "-t", "0")
    code, streamed, _ = cli(*common)
    assert code == 0
    code, plain, _ = cli(*common, "--no-stream", "--logprobs", "2", "--stop", "zzzz")
    assert code == 0
    assert plain.startswith(streamed)  # the same text, then the logprobs table
    table = plain[len(streamed) :].splitlines()
    assert table[0].startswith("token\tlogprob") and len(table) == 13


def test_generate_with_a_seed_is_reproducible(model_dir, cli):
    args = gen_args(model_dir, "-p", "the quick", "-n", "16", "-t", "1.0", "--top-p", "0.9", "--seed", "7")
    first, second = cli(*args), cli(*args)
    assert first[0] == 0 and first == second
    assert cli(*args[:-1], "8")[1] != first[1]


def test_stop_string_is_not_printed(model_dir, cli):
    code, full, _ = cli(*gen_args(model_dir, "-p", "hello", "-n", "20", "-t", "0"))
    stop = full.strip()[4:7]
    code, out, _ = cli(*gen_args(model_dir, "-p", "hello", "-n", "20", "-t", "0", "--stop", stop))
    assert code == 0 and out == full[: full.index(stop)] + "\n"


def test_chat_with_piped_stdin(model_dir, cli):
    script = "hello\n/reset\n/system be brief\nhi there\n"
    code, out, err = cli("chat", "--model", str(model_dir), "-n", "6", "-t", "0", "--threads", "1", stdin=script)
    assert code == 0
    assert "conversation cleared" in err and "system prompt set" in err
    assert out.count("\n") == 2  # two answers, each ended by a newline


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--max-new-tokens", "0"], "max_new_tokens must be"),
     (["--temperature", "-1"], "temperature must be >= 0"),
     (["--top-p", "1.5"], "top_p must be in"),
     (["--prompt", "hello world " * 200], "leaves no room to generate")],
)  # fmt: skip
def test_generate_bad_input_is_reported(model_dir, cli, args, message):
    base = {"--prompt": "hi", **dict(zip(args[::2], args[1::2]))}
    code, _, err = cli(*gen_args(model_dir, *[x for kv in base.items() for x in kv]))
    assert code == 2
    assert message in err


def test_download_errors(tmp_path, cli, monkeypatch):
    from huggingface_hub import constants

    code, _, err = cli("download", "not-a-model")
    assert code == 2 and "unknown model 'not-a-model'" in err
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    code, _, err = cli("download", "owner/missing-repo", "--offline")
    assert code == 2 and "not in the local Hugging Face cache" in err


def test_prompt_cache_file_is_written_then_reused(model_dir, cli, tmp_path):
    cache = tmp_path / "prompt.cache"
    prompt = "the quick brown fox jumps over the lazy dog, " * 4
    args = gen_args(model_dir, "-p", prompt, "-n", "8", "-t", "0", "-v", "--prompt-cache", str(cache))
    code, first, err = cli(*args)
    assert code == 0 and cache.exists() and "0 prompt tokens from prompt.cache" in err and "saved" in err
    code, second, err = cli(*args)
    assert code == 0 and second == first
    assert "0 prompt tokens from" not in err and "prompt tokens from prompt.cache" in err
    cache.write_bytes(b"corrupt")
    code, _, err = cli(*args)
    assert code == 2 and "--prompt-cache" in err and "not a readable prompt-cache file" in err


def test_speculative_options_keep_the_greedy_text(model_dir, cli):
    common = gen_args(model_dir, "-p", "hello world, the quick brown fox", "-n", "24", "-t", "0")
    code, plain, _ = cli(*common)
    assert code == 0
    code, ngram, err = cli(*common, "--speculative-ngram", "-v")
    assert code == 0 and ngram == plain and "drafts accepted" in err
    code, drafted, err = cli(*common, "--draft-model", str(model_dir), "--num-speculative", "3", "-v")
    assert code == 0 and drafted == plain
    code, _, err = cli(*common, "--draft-model", str(model_dir), "--speculative-ngram")
    assert code == 2 and "choose one of --draft-model and --speculative-ngram" in err


def test_output_constraints(model_dir, cli, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "answer.gbnf").write_text('root ::= ("yes" | "no") "!"\n')
    common = gen_args(model_dir, "-p", "hello world", "-n", "40", "-t", "1.0", "--seed", "3")
    code, out, err = cli(*common, "--json-schema", str(tmp_path / "schema.json"))
    assert code == 0, err
    value = json.loads(out)
    assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3) and set(value) == {"ok", "n"}
    code, out, err = cli(*common, "--grammar", str(tmp_path / "answer.gbnf"))
    assert code == 0 and out.strip() in ("yes!", "no!"), err
    code, out, _ = cli(*common, "--choice", "red", "--choice", "green")
    assert out.strip() in ("red", "green")
    code, out, _ = cli(*common, "--regex", "[0-9]{4}")
    assert len(out.strip()) == 4 and out.strip().isdigit()
    code, out, _ = cli(*common, "--json")
    assert code == 0 and out.startswith("{")  # an object (cut short when the tokens run out)


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"s.json": '{"type": "array", "uniqueItems": true}'}, ["--json-schema", "s.json"], 'keyword.*"uniqueItems"'),
        ({"s.json": "{not json"}, ["--json-schema", "s.json"], "s.json: the JSON schema is not valid JSON"),
        ({"g.gbnf": 'root ::= "a" ('}, ["--grammar", "g.gbnf"], r"g.gbnf: the grammar does not parse: Expected '\)'"),
        ({}, ["--grammar", "missing.gbnf"], "--grammar .*missing.gbnf: No such file"),
        ({}, ["--regex", "a", "--choice", "b"], "at most one output constraint, got --regex, --choice"),
    ],
)
def test_bad_constraints_are_reported(model_dir, cli, tmp_path, monkeypatch, files, args, message):
    import re

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*gen_args(model_dir, "-p", "hi", "-n", "4", *args))
    assert code == 2 and re.search(message, err), err
