"""The device-mesh layout on one process: sizes resolved from the recipe, refusals that name the numbers before
any weight exists, pipeline stages that compute the whole model's function, and checkpoints of another model
shape refused by name. The multi-process runs are in test_mesh_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loop import tiny_recipe

import llamaforge
from llamaforge.checkpoint import load_model, model_tensors, save_model
from llamaforge.config import get_preset
from llamaforge.errors import CheckpointError, UserError
from llamaforge.model import build_model
from llamaforge.train import checkpointing
from llamaforge.train.mesh import ParallelDims, check_model, resolve_dims
from llamaforge.train.pipeline import rank_stage_ids, split_stages, stage_layer_ids
from llamaforge.train.recipe import Recipe, Trainer


def test_resolve_dims() -> None:
    assert resolve_dims(1) == ParallelDims(1, 1, 1, "none")
    assert resolve_dims(4) == ParallelDims(4, 1, 1, "ddp")  # auto on several processes: DDP, as before
    assert resolve_dims(4, tp=2) == ParallelDims(2, 2, 1, "fsdp")  # the rest of the world shards the data
    assert resolve_dims(4, dp_shard=4) == ParallelDims(4, 1, 1, "fsdp")
    assert resolve_dims(2, tp=2) == ParallelDims(1, 2, 1, "none")
    dims = resolve_dims(8, tp=2, pp=2, pp_schedule="Interleaved1F1B")
    assert (dims.dp, dims.dp_mode, dims.stages_per_rank, dims.n_stages) == (2, "fsdp", 2, 4)
    assert resolve_dims(2, pp=2, pp_schedule="GPipe").n_stages == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 4, "tp": 3}, r"tp 3 x pp 1 = 3 does not divide the world size 4"),
        ({"world_size": 6, "tp": 2, "dp_shard": 2}, r"dp_shard 2 x tp 2 x pp 1 = 4 processes, but the world size "
                                                    r"is 6; set dp_shard to -1 or to 3"),
        ({"world_size": 4, "tp": 2, "dp_mode": "ddp"}, r"'ddp' does not compose with tensor or pipeline"),
        ({"world_size": 2, "dp_mode": "none"}, r"'none' cannot run 2 data-parallel processes"),
        ({"world_size": 2, "pp": 2, "pp_schedule": "zero-bubble"}, r"pp_schedule 'zero-bubble': choose one of"),
        ({"world_size": 2, "pp": 2, "stages_per_rank": 2}, r"1F1B runs one stage per rank"),
        ({"world_size": 2, "tp": 0}, r"parallel.tp must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_resolve_dims_refuses(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_dims(**kwargs)


@pytest.mark.parametrize(
    ("dims", "overrides", "message"),
    [
        (ParallelDims(1, 8, 1), {}, r"n_heads \(4\) is not divisible by parallel.tp \(8\); n_kv_heads \(2\) is not"),
        (ParallelDims(1, 2, 1), {"vocab_size": 257}, r"vocab_size \(257\) is not divisible by parallel.tp \(2\)"),
        (ParallelDims(1, 1, 4), {}, r"n_layers \(2\) is not divisible by the 4 pipeline stages"),
        (ParallelDims(1, 1, 2, pp_schedule="Interleaved1F1B", stages_per_rank=2), {},
         r"n_layers \(2\) is not divisible by the 4 pipeline stages \(parallel.pp 2 x 2 stage\(s\) per rank\)"),
        (ParallelDims(1, 1, 2), {"tie_embeddings": True}, r"tied input/output embeddings cannot be split"),
        (ParallelDims(1, 1, 2), {"n_layers": 4, "_microbatches": 1}, r"1F1B schedule needs at least parallel.pp "
                                                                     r"\(2\) micro-batches per step"),
    ],
)  # fmt: skip
def test_check_model_names_the_numbers(dims: ParallelDims, overrides: dict, message: str) -> None:
    microbatches = overrides.pop("_microbatches", 4)
    config = get_preset("tiny", **overrides)
    with pytest.raises(UserError, match=message):
        check_model(dims, config, seq_len=32, microbatches=microbatches)


def test_check_model_refuses_tensor_parallel_moe() -> None:
    with pytest.raises(UserError, match="expert parallelism"):
        check_model(ParallelDims(1, 2, 1), get_preset("tiny-moe"), seq_len=32, microbatches=1)


def test_recipe_parallel_section(tmp_path: Path) -> None:
    yaml = tmp_path / "r.yaml"
    yaml.write_text("parallel:\n  tp: 2\n  pp: 2\n  pp_schedule: GPipe\n")
    recipe = Recipe.load(yaml, {"parallel.dp_shard": "2"})
    assert (recipe.parallel.tp, recipe.parallel.pp, recipe.parallel.dp_shard) == (2, 2, 2)
    assert recipe.parallel_dims(8) == ParallelDims(2, 2, 2, "fsdp", "GPipe")
    assert "parallel:" in recipe.to_yaml()
    with pytest.raises(UserError, match=r"parallel.pp_schedule 'Pipe' must be one of GPipe, 1F1B, Interleaved1F1B"):
        Recipe.load(None, {"parallel.pp_schedule": "Pipe"})
    with pytest.raises(UserError, match=r"parallel: unknown field\(s\) \['dp'\]"):
        Recipe.load(None, {"parallel.dp": "2"})
    with pytest.raises(UserError, match=r"train.compile with train.activation_checkpointing and parallel.tp > 1"):
        Recipe.load(None, {"parallel.tp": "2", "train.compile": "true", "train.activation_checkpointing": "true"})


def test_bad_layout_fails_before_any_weight_exists(prepared: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    built = []
    monkeypatch.setattr(Trainer, "_build_model", lambda self, device: built.append(device))
    with pytest.raises(UserError, match="tp 2 x pp 1 = 2 does not divide the world size 1"):
        Trainer(tiny_recipe(prepared, tmp_path, **{"parallel.tp": "2"})).fit()
    with pytest.raises(UserError, match=r"n_heads \(4\) is not divisible by parallel.tp \(3\)"):
        check_model(resolve_dims(3, tp=3), tiny_recipe(prepared, tmp_path).model_config(), 32, 1)
    assert built == []


def test_stages_compute_the_whole_model() -> None:
    """A model split into 4 stages (2 blocks each), run one stage after the other, gives the whole model's logits;
    each stage keeps the whole model's tensor names."""
    config = get_preset("tiny", n_layers=8, vocab_size=258, max_seq_len=64)
    torch.manual_seed(0)
    whole = build_model(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = whole(tokens)
    assert stage_layer_ids(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_stage_ids(1, pp=2, stages_per_rank=2) == [1, 3]  # looped: rank 1 runs stages 1 and 3
    stages = {}
    for rank in range(2):
        model = build_model(config, init=False)
        model.load_state_dict(whole.state_dict())
        names = set(model.state_dict())
        parts = split_stages(model, rank_stage_ids(rank, 2, 2), n_stages=4)
        assert set(model.state_dict()) < names  # the rank's model keeps some tensors, under the same names
        for part, s in zip(parts, rank_stage_ids(rank, 2, 2)):
            held = {".".join(n.split(".")[:2]) for n in part.state_dict() if n.startswith("layers.")}
            assert held == {f"layers.{i}" for i in stage_layer_ids(8, 4)[s]}
            stages[s] = part.eval()
    x = tokens
    with torch.no_grad():
        for s in range(4):
            x = stages[s](x)
    assert stages[0].output is None and stages[3].tok_embeddings is None
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_checkpoint_of_another_shape_is_refused_by_name(prepared: Path, tmp_path: Path) -> None:
    Trainer(tiny_recipe(prepared, tmp_path / "a", **{"train.steps": "2", "train.ckpt_interval": "2"})).fit()
    step = tmp_path / "a" / "checkpoints" / "step_00000002"

    def resume(out: str, shape: str) -> Trainer:
        overrides = {"train.resume": str(step), "model.overrides": f"{{vocab_size: 258, max_seq_len: 64, {shape}}}"}
        return Trainer(tiny_recipe(prepared, tmp_path / out, **overrides))

    with pytest.raises(CheckpointError, match=r"tensor 'model.tok_embeddings.weight' has shape \(258, 64\) in the "
                                              r"checkpoint but \(258, 128\) in this model"):  # fmt: skip
        resume("b", "dim: 128").fit()
    with pytest.raises(CheckpointError, match=r"has no tensor 'model.layers.2.attention"):
        resume("c", "n_layers: 3").fit()
    with pytest.raises(CheckpointError, match=r"has tensor\(s\) this model lacks \(model.layers.1"):
        resume("d", "n_layers: 1").fit()


def test_training_checkpoint_loads_and_converts(prepared: Path, tmp_path: Path) -> None:
    """A DCP training checkpoint is a source for load() and convert: the same weights as the run's export."""
    trainer = Trainer(tiny_recipe(prepared, tmp_path, **{"train.steps": "2", "train.ckpt_interval": "2"}))
    trainer.fit()
    step = tmp_path / "checkpoints" / "step_00000002"
    assert checkpointing.saved_shapes(step)["model.output.weight"] == (258, 64)
    llm = llamaforge.load(step)
    assert llm.format == "dcp" and llm.config.n_layers == 2
    final, _ = load_model(tmp_path / "final")
    for name, tensor in model_tensors(final).items():
        assert torch.equal(model_tensors(llm.model)[name], tensor), name
    save_model(llm.model, tmp_path / "out.gguf", "gguf")
    again, fmt = load_model(tmp_path / "out.gguf")
    assert fmt == "gguf" and torch.equal(again.output.weight, final.output.weight)
    with pytest.raises(CheckpointError, match="written by training"):
        save_model(llm.model, tmp_path / "x", "dcp")


def test_data_rank_is_the_mesh_coordinate() -> None:
    """``ParallelDims.data_rank`` (what the fine-tuning loaders read) is ``build_layout``'s dp coordinate on every
    rank of a pp 2 x dp 2 x tp 2 mesh (built on torch's fake process group, one rank at a time)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from llamaforge.train.mesh import build_layout

    dims = ParallelDims(2, 2, 2, "fsdp")
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            layout = build_layout(dims, torch.device("cpu"), rank)
        finally:
            dist.destroy_process_group()
        assert dims.data_rank(rank) == layout.dp_rank, rank
    assert [ParallelDims(4, 1, 1, "ddp").data_rank(r) for r in range(4)] == [0, 1, 2, 3]
