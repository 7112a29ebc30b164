"""The tokenizer interface on every backend: SentencePiece, tiktoken, tokenizer.json and GGUF vocabularies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaforge.chat import named_template
from llamaforge.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    clean_text,
    load_tokenizer,
    split_long_runs,
)

spm = pytest.importorskip("sentencepiece")

TEXTS = [
    "Hello, world!",
    "  two  spaces\tand\ttabs\n\nnew lines\r\n",
    "digits 0 12 345 6789 1234567890 3.14159",
    "def f(x):\n    return x ** 2  # code\n",
    "日本語 テキスト 中文 字符 café naïve e\u0301",
    "emoji 😀👍🏽 and text",
    "<s> [INST] <|eot_id|> </s> typed by a user",
    "",
    " ",
]

INFILL = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]


def train_sentencepiece(directory: Path) -> Path:
    """A small LLaMA-like SentencePiece BPE model (byte fallback, split digits, identity normalization)."""
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "hello",
        "world",
        "def",
        "return",
        "import",
        "class",
        "self",
        "print",
        "value",
        "llama",
        "model",
        "token",
        "data",
        "日本語",
        "テキスト",
        "中文",
        "字符",
        "café",
        "naïve",
    ]
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99999)}"
        for _ in range(2000)
    ]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        control_symbols=INFILL,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return directory / "sp.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp_tok(sp_model: Path) -> SentencePieceTokenizer:
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


def write_vocab_gguf(path: Path, meta: dict) -> Path:
    """A vocab-only GGUF holding the given tokenizer.* keys (and the llama keys llama.cpp needs to open it)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(len(meta["tokenizer.ggml.tokens"]))
    for key, value in (
        ("context_length", 64),
        ("embedding_length", 64),
        ("block_count", 1),
        ("feed_forward_length", 128),
        ("attention.head_count", 4),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in meta:
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    for key in ("bos", "eos", "unknown", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", meta[f"tokenizer.ggml.{key}_token_id"])
    for key in ("add_bos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{key}" in meta:
            writer.add_bool(f"tokenizer.ggml.{key}", meta[f"tokenizer.ggml.{key}"])
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- SentencePiece ----------------------------------------------------------------------------------
def test_sentencepiece_matches_sentencepiece(sp_tok: SentencePieceTokenizer, sp_model: Path) -> None:
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in TEXTS:
        ids = sp_tok.encode(text)
        assert ids == ref.encode(text), text
        assert sp_tok.decode(ids) == ref.decode(ids), text
    rng = random.Random(1)
    for _ in range(200):  # any id sequence, incl. byte pieces and <unk>, decodes as sentencepiece does
        ids = [rng.randrange(3, sp_tok.vocab_size) if rng.random() < 0.9 else 0 for _ in range(rng.randint(1, 8))]
        assert sp_tok.decode(ids, skip_special=True) == ref.decode(ids), ids


def test_sentencepiece_interface(sp_tok: SentencePieceTokenizer) -> None:
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.vocab_size) == (1, 2, 400)
    assert sp_tok.add_bos_default and sp_tok.kind == "sentencepiece"
    ids = sp_tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    # Typed special-token text stays text unless asked for.
    assert 1 not in sp_tok.encode("<s>hello")
    assert sp_tok.encode("<s>hello", allow_special=True) == [1, *sp_tok.encode("hello")]
    assert sp_tok.token_id("<s>") == 1 and sp_tok.token_id("<PRE>") == sp_tok.token_id("▁<PRE>") is not None
    assert sp_tok.token_id("no such piece") is None
    assert sp_tok.stop_ids == {2, sp_tok.token_id("▁<EOT>")}  # Code Llama's end of infilling stops too
    assert sp_tok.chat_format == "codellama"
    assert sp_tok.decode([1, *sp_tok.encode("hi")]) == "<s>hi"
    assert sp_tok.decode([1, *sp_tok.encode("hi")], skip_special=True) == "hi"
    with pytest.raises(ValueError, match="out of range"):
        sp_tok.decode([400])


def test_codellama_infill(sp_tok: SentencePieceTokenizer) -> None:
    pre, suf, mid = (sp_tok.token_id(t) for t in ("<PRE>", "<SUF>", "<MID>"))
    ids = sp_tok.encode_infill("def f(x):", "return x")
    # Meta encodes the suffix without the dummy-prefix space by encoding "☺" + suffix and dropping the ☺ tokens.
    prefix, suffix = sp_tok.encode("def f(x):"), sp_tok.sp.encode("☺return x")[len(sp_tok.sp.encode("☺")) :]
    assert ids == [1, pre, *prefix, suf, *suffix, mid]
    assert sp_tok.encode_infill("a", "b", suffix_first=True)[:3] == [1, pre, suf]


# --- robustness -------------------------------------------------------------------------------------
def test_invalid_utf8_and_surrogates_never_crash(sp_tok: SentencePieceTokenizer, llama3: TiktokenTokenizer) -> None:
    assert clean_text(b"a\xffb\xe4\xb8c") == "a\ufffdb\ufffd\ufffdc"  # one U+FFFD per bad byte, like llama.cpp
    assert clean_text("a\ud800b\U0001f600") == "a\ufffdb\U0001f600"
    assert clean_text("\ud83d\ude00") == "\U0001f600"  # a surrogate pair is the character it encodes
    for tok in (sp_tok, llama3):
        assert tok.encode(b"x\xff\xfey") == tok.encode("x\ufffd\ufffdy")
        assert tok.encode("x\udfffy") == tok.encode("x\ufffdy")
    with pytest.raises(TypeError):
        sp_tok.encode(123)  # type: ignore[arg-type]


def _reference_split(s: str, limit: int) -> list[str]:
    """Meta's per-character splitting of over-long whitespace / non-whitespace runs, for comparison."""
    out, run, is_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if is_space ^ ch.isspace():
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                out.append(s[start:i])
                start, run = i, 1
    out.append(s[start:])
    return out


@pytest.mark.parametrize(
    "text",
    [
        "a" * 25_000,
        "a" * 25_001,
        "x " + "b" * 60_000 + " y",
        " " * 50_001 + "z",
        "\u3000" * 25_003 + "a",
        " " * 7 + "b" * 25_001 + " " + "c" * 37_499 + "\n" * 25_002 + "d" * 50_000,
        ("word " * 9000) + "c" * 70_000,
        "",
    ],
)
def test_split_long_runs_matches_meta(text: str) -> None:
    assert split_long_runs(text) == _reference_split(text, 25_000)


# --- streaming --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sp_tok", "llama3", "smol"])
def test_incremental_decoding(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    for text in [*TEXTS, "日本語😀👍🏽 e\u0301 ñ " * 3]:
        ids = tok.encode(text)
        decoder = tok.decoder()
        pieces = [decoder.add(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ids), text
        assert all("\ufffd" not in p for p in pieces)  # never a broken character
    # A stream cut inside a character keeps it back until flush.
    ids = tok.encode("😀")
    decoder = tok.decoder()
    if len(ids) > 1:
        assert decoder.add(ids[0]) == ""


# --- tiktoken ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama3() -> TiktokenTokenizer:
    models = pytest.importorskip("llama_models")
    return load_tokenizer(Path(models.__file__).parent / "llama3" / "tokenizer.model")


def test_llama3_interface(llama3: TiktokenTokenizer) -> None:
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.stop_ids == {128001, 128008, 128009}  # end_of_text, eom, eot
    assert llama3.token_id("<|eot_id|>") == 128009 and llama3.token_id("<|reserved_special_token_247|>") is None
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in llama3.encode("<|eot_id|>")
    ids = llama3.encode(" hello")
    assert [llama3.id_to_piece(i) for i in ids] == ["Ġhello"] and llama3.token_id("Ġhello") == ids[0]
    assert llama3.chat_format == "llama3" and llama3.add_bos_default
    assert llama3.decode([128000, *llama3.encode("hi")], skip_special=True) == "hi"


def test_directory_sniffs_tiktoken_and_sentencepiece(tmp_path: Path, llama3: TiktokenTokenizer, sp_model: Path) -> None:
    meta = tmp_path / "meta3"
    meta.mkdir()
    (meta / "tokenizer.model").write_bytes(llama3.path.read_bytes())
    assert isinstance(load_tokenizer(meta), TiktokenTokenizer)
    sp_dir = tmp_path / "meta2"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    empty = tmp_path / "weights_only"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(empty)
    bad = tmp_path / "bad" / "tokenizer.model"
    bad.parent.mkdir()
    bad.write_text("aGVsbG8= 0\nnot a line\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model:2"):
        load_tokenizer(bad)


# --- GGUF -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(request: pytest.FixtureRequest) -> HFTokenizer:
    path = request.getfixturevalue("smollm2_gguf")
    return load_tokenizer(path)


def test_gguf_llama_vocab_is_sentencepiece(sp_tok: SentencePieceTokenizer, sp_model: Path, tmp_path: Path) -> None:
    gguf_path = write_vocab_gguf(tmp_path / "vocab.gguf", sp_tok.gguf_metadata())
    tok = load_tokenizer(gguf_path)
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, sp_tok.stop_ids)
    meta = tok.gguf_metadata()
    assert meta["tokenizer.ggml.tokens"] == sp_tok.pieces and meta["tokenizer.ggml.token_type"] == sp_tok.types


def test_gguf_gpt2_vocab(smol: HFTokenizer) -> None:
    assert (smol.bos_id, smol.eos_id, smol.vocab_size) == (1, 2, 49152)
    assert not smol.add_bos_default  # tokenizer.ggml.add_bos_token = false
    assert smol.stop_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert smol.encode("<|im_end|>", allow_special=True) == [2] and 2 not in smol.encode("<|im_end|>")
    # The "smollm" pre-tokenizer puts every digit in a token of its own.
    assert [smol.id_to_piece(i) for i in smol.encode("x  123")] == ["x", "ĠĠ", "1", "2", "3"]
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    meta = smol.gguf_metadata()
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.merges"]) == 48900


def test_gguf_errors(tmp_path: Path, sp_tok: SentencePieceTokenizer) -> None:
    meta = dict(sp_tok.gguf_metadata())
    meta["tokenizer.ggml.model"] = "gpt2"
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(ValueError, match="no-such-pre"):
        load_tokenizer(write_vocab_gguf(tmp_path / "a.gguf", meta))
    meta = dict(sp_tok.gguf_metadata())
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"][:-1], meta["tokenizer.ggml.tokens"][5]]
    with pytest.raises(ValueError, match="repeats"):
        load_tokenizer(write_vocab_gguf(tmp_path / "b.gguf", meta))


# --- export -----------------------------------------------------------------------------------------
def test_save_pretrained_round_trips(
    tmp_path: Path, sp_tok: SentencePieceTokenizer, smol: HFTokenizer, llama3: TiktokenTokenizer
) -> None:
    for name, tok in (("sp", sp_tok), ("smol", smol), ("l3", llama3)):
        out = tok.save_pretrained(tmp_path / name)
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert config["bos_token"] == tok.bos_token and config["eos_token"] == tok.eos_token
        # a named chat format (no template of its own) is written as its equivalent template, for other engines
        template = tok.chat_template or (named_template(tok.chat_format) if tok.chat_format else None)
        assert config.get("chat_template") == template
        again = load_tokenizer(out)
        assert type(again) is type(tok)
        # the template back, or (Meta's tiktoken directory, read without tokenizer_config.json) the same named format
        assert again.chat_template == template or (again.chat_template is None and again.chat_format == tok.chat_format)
        for text in TEXTS:
            assert again.encode(text) == tok.encode(text), (name, text)
            assert again.encode(text, allow_special=True) == tok.encode(text, allow_special=True), (name, text)
        assert again.stop_ids == tok.stop_ids and again.add_bos_default == tok.add_bos_default


def test_gguf_metadata_from_tiktoken_rebuilds_the_tokenizer(llama3: TiktokenTokenizer, tmp_path: Path) -> None:
    meta = llama3.gguf_metadata()
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and len(meta["tokenizer.ggml.tokens"]) == 128256
    tok = load_tokenizer(write_vocab_gguf(tmp_path / "l3.gguf", meta))
    for text in TEXTS:
        assert tok.encode(text) == llama3.encode(text), text
    assert tok.add_bos_default and tok.stop_ids == llama3.stop_ids
