"""``trainer=fsdp_sim``: Lightning's FSDP path with 2 CPU ranks over gloo, end to end.

The run's student is gathered from its shards before it leaves training, so the export is the whole model;
it must equal a 1-process run that sees the same global batches; each rank holds about half the teacher;
and a run killed mid-way resumes from its full-state-dict checkpoint to the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import ConfigError
from distill.recipe.strategies import check_sharded_callbacks
from tests.helpers import SGD, SIM_RUN, assert_killed_run_resumes, assert_sharded_run_matches, run_train_cli
from train import train

COMMON = SIM_RUN


def _fsdp(run: Path, *extra: str) -> list[str]:
    return [*COMMON, "trainer=fsdp_sim", "data.batch_size=2", f"hydra.run.dir={run}", *extra]


@pytest.mark.ddp
def test_two_fsdp_ranks_export_the_gathered_student_of_one_process_with_twice_the_batch(tiny_cfg, tmp_path, cache_dir):
    # The 2-rank run takes the chunked loss (the teacher unit gathered for it, distill.runtime.gather), the
    # 1-process run the plain one (auto is off at this vocabulary): equal weights mean equal losses and gradients.
    run = tmp_path / "fsdp"
    tied = "student.tie_word_embeddings=true"  # rank 1 builds it empty: its tie must survive (tie_again)
    proc = run_train_cli(_fsdp(run, *SGD, tied, "distill.objective.chunked=true"), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "FullyShardedDataParallel" in out  # Lightning's FSDP path ran

    single_cfg = tiny_cfg(*COMMON[1:], *SGD, tied, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    assert "the loss takes the chunked path" in out and not single["module"].chunked
    assert single["student"].lm_head.weight is single["student"].model.embed_tokens.weight
    # Only rank 0 read the teacher; rank 1 built both models empty and was filled unit by unit from rank 0, so
    # the equal weights below also check that fill (rank_zero_load.py).
    assert "rank 1 builds the teacher and student empty" in out and "rank 0 builds" not in out
    # limit_val_batches=1: rank 0 validates the batch, rank 1 a padding batch (no hang, weighs nothing). The
    # student's size is the sum of its shards; FSDP pads each unit to a multiple of 2 (the teacher's half).
    assert_sharded_run_matches(run, tmp_path / "single", single, out)


@pytest.mark.ddp
@pytest.mark.slow  # three 2-rank runs; the default suite writes and gathers FSDP checkpoints in the test above
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir):
    # The recipe's AdamW: its moments are in the checkpoint. (Lightning's FSDP loader cannot read the empty
    # optimizer state of plain SGD without momentum; no recipe uses it.)
    checkpoints = assert_killed_run_resumes(_fsdp, tmp_path, cache_dir)
    assert (checkpoints / "last.ckpt").is_file()  # FSDP's full state dict: one plain file


@pytest.mark.parametrize(
    ("stage", "strategy"),
    # qat, share and lowrank run under both, prune under FSDP: tests/runtime/test_fsdp_compress.py
    [("sparsity", "fsdp"), ("sparsity", "fsdp_sim"), ("sparsity", "deepspeed_stage_3"), ("prune", "deepspeed_stage_3")],
)
def test_compression_under_sharding_is_refused_at_start_up_naming_the_strategy(stage, strategy):
    from tests.conftest import compose_cfg

    cfg = compose_cfg([f"trainer={strategy}", f"callbacks={stage}"], Path("/tmp/unused"), Path("/tmp/unused"))
    with pytest.raises(
        ConfigError, match=rf"callbacks\.{stage}.*not supported under the {strategy.split('_stage')[0]}"
    ):
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)
    cfg = compose_cfg(["trainer=ddp_sim", f"callbacks={stage}"], Path("/tmp/unused"), Path("/tmp/unused"))
    check_sharded_callbacks(cfg.trainer, cfg.callbacks)  # every DDP rank holds the whole student: allowed


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_sim"])
def test_zero2_takes_compression_except_pruning(strategy):
    from tests.conftest import compose_cfg

    for stage in ("share", "lowrank", "sparsity", "qat"):  # ZeRO-2 keeps every parameter whole on every rank
        cfg = compose_cfg(
            [f"trainer={strategy}", "trainer.strategy.stage=2", f"callbacks={stage}"], Path("/tmp/u"), Path("/tmp/u")
        )
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)
    cfg = compose_cfg(
        [f"trainer={strategy}", "trainer.strategy.stage=2", "callbacks=prune"], Path("/tmp/u"), Path("/tmp/u")
    )
    with pytest.raises(ConfigError, match=r"callbacks\.prune.*deepspeed.*rebuilds the optimizer"):
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)


def test_sharded_strategies_export_and_evaluate_without_compression_stages():
    from tests.conftest import compose_cfg

    # The student is gathered before export and evaluation under both (test_zero3_gather, the fsdp_sim runs).
    for strategy in ("fsdp_sim", "deepspeed_stage_3"):
        cfg = compose_cfg([f"trainer={strategy}", "~experiment"], Path("/tmp/unused"), Path("/tmp/unused"))
        assert cfg.export.enabled and cfg.eval.enabled
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)


def test_models_built_empty_keep_their_tied_embeddings():
    from distill.runtime.rank_zero_load import empty_weights, tie_again
    from tests.helpers import tiny_llama

    with empty_weights():
        model = tiny_llama()  # tied embeddings
    assert model.lm_head.weight.is_meta and model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers real
    tie_again(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
