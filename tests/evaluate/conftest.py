"""A tiny random-weight Hugging Face Llama with a small trained BPE tokenizer, saved the way the hub does."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def _corpus() -> list[str]:
    lines = []
    for path in sorted(DATA.rglob("*.jsonl")):
        lines += path.read_text(encoding="utf-8").splitlines()
    lines += ["Question: Answer: Q: A: The following are multiple choice questions (with answers) about"] * 3
    return lines


def make_hf_model(directory: Path, seed: int = 0, vocab_size: int = 384, layers: int = 2) -> Path:
    """Save a random LlamaForCausalLM and a byte-level BPE tokenizer (adds BOS like Llama's) to `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tk.train_from_iterator(_corpus(), trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=160,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.08,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return make_hf_model(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
