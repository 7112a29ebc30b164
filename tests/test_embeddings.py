"""Embeddings: pooled final hidden states, the same batched or alone, and as transformers computes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaforge.embeddings import embed, embed_ids, encode_inputs
from llamaforge.llm import LLM

SEQUENCES = [[5, 9, 2, 44, 7], [3], [8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 100], [17, 4]]


def test_padding_and_batching_change_nothing(tiny_model) -> None:
    for pooling in ("mean", "last"):
        batched = embed_ids(tiny_model, SEQUENCES, pooling=pooling)
        one_by_one = torch.cat([embed_ids(tiny_model, [s], pooling=pooling) for s in SEQUENCES])
        tight = embed_ids(tiny_model, SEQUENCES, pooling=pooling, max_batch_tokens=11)  # several forwards
        torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tight, batched, atol=1e-5, rtol=1e-4)
        assert batched.shape == (4, tiny_model.config.dim) and batched.dtype == torch.float32
        torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4))


def test_pooling_reads_the_hidden_states(tiny_model) -> None:
    ids = SEQUENCES[0]
    with torch.no_grad():
        hidden = tiny_model(torch.tensor([ids]), return_hidden=True)[0].float()
    mean = embed_ids(tiny_model, [ids], pooling="mean", normalize=False)[0]
    last = embed_ids(tiny_model, [ids], pooling="last", normalize=False)[0]
    torch.testing.assert_close(mean, hidden.mean(0))
    torch.testing.assert_close(last, hidden[-1])


def test_bad_inputs_are_named(tiny_model) -> None:
    llm = LLM(tiny_model, None, tiny_model.config)
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        embed_ids(tiny_model, SEQUENCES, pooling="cls")
    with pytest.raises(ValueError, match="input 1 is empty"):
        encode_inputs(llm, [[1, 2], []])
    with pytest.raises(ValueError, match="input 0: token id 99999 is outside the vocabulary"):
        encode_inputs(llm, [[99999]])
    with pytest.raises(ValueError, match="no tokenizer"):
        encode_inputs(llm, "text needs a tokenizer")
    too_long = [1] * (tiny_model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="more than the model's context"):
        embed_ids(tiny_model, [too_long])
    assert encode_inputs(llm, [4, 5]) == [[4, 5]] and encode_inputs(llm, [[4], [5, 6]]) == [[4], [5, 6]]


@pytest.mark.conformance
def test_mean_pooled_embeddings_match_transformers(tiny_model, tmp_path: Path) -> None:
    """Mean pooling over the attention mask of transformers' last_hidden_state (after the final norm), the way
    sentence-embedding code pools a LlamaModel, on a right-padded batch."""
    transformers = pytest.importorskip("transformers")
    from llamaforge.checkpoint import save_model

    save_model(tiny_model, tmp_path, "hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    width = max(len(s) for s in SEQUENCES)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in SEQUENCES])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQUENCES])
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(embed_ids(tiny_model, SEQUENCES), expected, atol=1e-5, rtol=1e-4)


def test_embed_texts_with_a_real_tokenizer(smollm2_gguf: Path) -> None:
    import llamaforge

    llm = llamaforge.load(smollm2_gguf)
    vectors = embed(llm, ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply."])
    similar, different = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > different  # even a small chat model places paraphrases closer together
    # alone or in a batch: the same up to the rounding of the GGUF blocks' kernels (which differ by batch shape)
    torch.testing.assert_close(embed(llm, "The cat sat on the mat.")[0], vectors[0], atol=1e-2, rtol=0)
