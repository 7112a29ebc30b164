"""Code Llama fill-in-the-middle against transformers: the ``<PRE> prefix <SUF>suffix <MID>`` prompt as its
``CodeLlamaTokenizer`` builds it (from ``tokenizer.model`` and from ``tokenizer.json``), and greedy infilling on a
tiny random Code Llama-layout model (``LlamaForCausalLM``, rope theta 1e6, the four infilling tokens) equal to
transformers' ``generate``. Then the same through ``llm.infill``, ``generate --suffix`` and the server."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

INFILL = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]  # Code Llama's four control pieces
CASES = [
    ("def add(a, b):\n    ", "\n    return c\n"),
    ("import model\n", "print(value)\n"),
    ("import model\n", " print(value)"),
    ("the quick", "dog 123"),
    ("", "return x"),
    ("class llama:", ""),
    ("data = '日本語'", "  # café\n"),
    ("x = (1 +", ") * 2  # dog"),
]


def _train_codellama_sp(directory: Path) -> Path:
    rng = random.Random(1)
    words = ["def", "return", "import", "class", "self", "print", "value", "llama", "model", "token", "data", "the"]
    words += ["quick", "brown", "fox", "dog", "日本語", "café", "(", ")", ":", "=", "+", "#"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(1500)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   normalization_rule_name="identity", add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, control_symbols=INFILL,
                                   allow_whitespace_only_pieces=True, minloglevel=2)  # fmt: skip
    return directory / "sp.model"


@pytest.fixture(scope="module")
def codellama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Code Llama-layout HF checkpoint with a SentencePiece tokenizer carrying the infilling tokens."""
    directory = tmp_path_factory.mktemp("codellama")
    sp_model = _train_codellama_sp(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a wider spread than the default init, so greedy tokens vary
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(directory / "model")
    (directory / "model" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return directory / "model"


@pytest.fixture(scope="module")
def hf_tokenizer(codellama_dir: Path):
    return transformers.CodeLlamaTokenizer.from_pretrained(codellama_dir)  # converts tokenizer.model


def _hf_infill_ids(hf_tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    return hf_tokenizer(prefix, suffix=suffix, suffix_first=suffix_first)["input_ids"]


def _meta_infill_ids(sp, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """Meta's codellama ``infilling_prompt_tokens``: the suffix encoded as "☺" + suffix with the ☺ tokens dropped."""
    bos, pre, suf, mid = 1, sp.piece_to_id("▁<PRE>"), sp.piece_to_id("▁<SUF>"), sp.piece_to_id("▁<MID>")
    suffix_ids = sp.encode("☺" + suffix)[len(sp.encode("☺")) :]
    if suffix_first:
        return [bos, pre, suf, *suffix_ids, mid, *sp.encode(prefix)]
    return [bos, pre, *sp.encode(prefix), suf, *suffix_ids, mid]


def _plain_edges(prefix: str, suffix: str) -> bool:
    # transformers' tokenizer.json conversion of a SentencePiece model differs from sentencepiece on text that starts
    # with spaces and on "▁" pieces around newlines; cases without whitespace at the edges avoid that difference.
    edges = (prefix[:1], prefix[-1:], suffix[:1], suffix[-1:])
    return bool(prefix and suffix) and not any(c.isspace() for c in edges)


def test_prompt_equals_meta_from_tokenizer_model(codellama_dir: Path, hf_tokenizer) -> None:
    ours = load_tokenizer(codellama_dir / "tokenizer.model")
    assert isinstance(ours, SentencePieceTokenizer)
    pre, suf, mid = (hf_tokenizer.convert_tokens_to_ids(t) for t in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    assert ours.fim_ids() == (pre, suf, mid)
    sp = spm.SentencePieceProcessor(model_file=str(codellama_dir / "tokenizer.model"))
    for prefix, suffix in CASES:
        for first in (False, True):
            got = ours.encode_infill(prefix, suffix, suffix_first=first)
            assert got == _meta_infill_ids(sp, prefix, suffix, first), (prefix, suffix, first)
            if _plain_edges(prefix, suffix) and not first:
                # transformers 5's CodeLlamaTokenizer agrees up to <SUF> but then starts the suffix with a dummy
                # "▁" that Meta's reference (and Code Llama's training format) does not have.
                want = _hf_infill_ids(hf_tokenizer, prefix, suffix)
                cut = got.index(suf) + 1
                assert got[:cut] == want[:cut], (prefix, suffix)


def test_prompt_from_tokenizer_json(codellama_dir: Path, hf_tokenizer, tmp_path: Path) -> None:
    """Code Llama repositories also ship tokenizer.json, where the infilling pieces are ordinary vocabulary: the
    same prompt as from tokenizer.model (Meta's), and <EOT> still ends generation."""
    hf_tokenizer.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(ours, HFTokenizer)
    assert ours.token_id("▁<EOT>") in ours.stop_ids
    sp = spm.SentencePieceProcessor(model_file=str(codellama_dir / "tokenizer.model"))
    for prefix, suffix in CASES:
        if _plain_edges(prefix, suffix):
            assert ours.encode_infill(prefix, suffix) == _meta_infill_ids(sp, prefix, suffix), (prefix, suffix)


def test_greedy_infill_equals_transformers(codellama_dir: Path, hf_tokenizer) -> None:
    ref = transformers.LlamaForCausalLM.from_pretrained(codellama_dir, torch_dtype=torch.float32).eval()
    llm = llamaforge.load(codellama_dir, dtype=torch.float32)
    eot = hf_tokenizer.convert_tokens_to_ids("▁<EOT>")
    for prefix, suffix in CASES[:3]:
        ids = llm.tokenizer.encode_infill(prefix, suffix)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[2, eot],
                               pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
        got = llm.infill(prefix, suffix, max_new_tokens=12, temperature=0)
        assert got.token_ids == out, (prefix, suffix)
        # The middle's text is what it adds to the decoded prompt (a leading space kept, as Meta's decode_infilling).
        middle = [t for t in out if t not in (2, eot)]
        head = hf_tokenizer.decode(ids, skip_special_tokens=True)
        full = hf_tokenizer.decode(ids + middle, skip_special_tokens=True)
        if "\ufffd" not in full:  # random byte pieces may decode to partial characters, replaced differently
            assert full.startswith(head) and got.text == full[len(head) :], (prefix, suffix)


def test_infill_stops_at_eot(codellama_dir: Path) -> None:
    llm = llamaforge.load(codellama_dir, dtype=torch.float32)
    eot = llm.tokenizer.token_id("▁<EOT>")
    word = llm.tokenizer.encode("llama")[-1]

    def write_then_end(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e9)
        forced[word if len(output_ids) < 2 else eot] = 0
        return forced

    got = llm.infill("x = ", "\n", max_new_tokens=8, temperature=0, logits_processors=[write_then_end])
    assert got.finish_reason == "stop" and got.token_ids == [word, word, eot]
    assert "<EOT>" not in got.text and got.text.strip() == llm.tokenizer.decode([word, word]).strip()


def test_generate_suffix_cli(codellama_dir: Path) -> None:
    llm = llamaforge.load(codellama_dir)
    want = llm.infill("def add(a, b):", "    return c", max_new_tokens=6, temperature=0).text
    run = subprocess.run([sys.executable, "-m", "llamaforge", "generate", "--model", str(codellama_dir),
                          "--prompt", "def add(a, b):", "--suffix", "    return c", "--temperature", "0",
                          "--max-new-tokens", "6", "--no-stream"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == want + "\n"


def test_infill_without_fim_tokens_is_refused(tmp_path: Path) -> None:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 50),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=300, model_type="bpe",
                                   byte_fallback=True, minloglevel=2)  # fmt: skip
    plain = load_tokenizer(tmp_path / "plain.model")
    assert plain.fim_ids() is None
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        plain.encode_infill("a", "b")


def test_gguf_infill_equals_the_hf_checkpoint(codellama_dir: Path, tmp_path: Path) -> None:
    """Converted to GGUF, the vocabulary keeps Code Llama's infilling pieces: the same prompt, the same middle."""
    from llamaforge.checkpoint import save_model

    llm = llamaforge.load(codellama_dir, dtype=torch.float32)
    save_model(llm.model, tmp_path / "m.gguf", "gguf", tokenizer=llm.tokenizer)
    gguf = llamaforge.load(tmp_path / "m.gguf")
    prefix, suffix = CASES[0]
    assert gguf.tokenizer.encode_infill(prefix, suffix) == llm.tokenizer.encode_infill(prefix, suffix)
    assert gguf.tokenizer.stop_ids == llm.tokenizer.stop_ids
    want = llm.infill(prefix, suffix, max_new_tokens=8, temperature=0)
    assert gguf.infill(prefix, suffix, max_new_tokens=8, temperature=0).token_ids == want.token_ids


@pytest.mark.parametrize("which", ["codellama", "smollm2"])
def test_fim_tokens_equal_llama_cpp(which: str, codellama_dir: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    """The infilling tokens found in a GGUF vocabulary are those llama.cpp finds: Code Llama's ▁<PRE> pieces, and
    none in the built-in SmolLM2's vocabulary (llama.cpp's -1)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llamaforge.checkpoint import save_model

    if which == "codellama":
        llm = llamaforge.load(codellama_dir)
        path = save_model(llm.model, tmp_path / "m.gguf", "gguf", tokenizer=llm.tokenizer)
    else:
        path = smollm2_gguf
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    want = (ref._model.token_prefix(), ref._model.token_suffix(), ref._model.token_middle())
    assert load_tokenizer(path).fim_ids() == (None if want == (-1, -1, -1) else want)
    assert (which == "codellama") == (want != (-1, -1, -1))
