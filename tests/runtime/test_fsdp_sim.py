"""``trainer=fsdp_sim``: Lightning's FSDP path with 2 CPU ranks over gloo, end to end.

The run's student is gathered from its shards before it leaves training, so the export is the whole model;
it must equal a 1-process run that sees the same global batches; each rank holds about half the teacher;
and a run killed mid-way resumes from its full-state-dict checkpoint to the same weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import ConfigError
from distill.runtime.strategies import check_sharded_callbacks
from tests.helpers import SGD, assert_same_losses, read_metrics, run_train_cli, series
from train import train

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "experiment=smoke",
    "distill.scheduler.num_warmup_steps=0",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.progress_bar=null",
    "eval.enabled=false",
]


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
    # limit_val_batches=1: rank 0 validates the batch, rank 1 a padding batch (no hang, weighs nothing).
    fsdp_val = dict(series(read_metrics(run), "val/loss"))
    single_val = dict(series(read_metrics(tmp_path / "single"), "val/loss"))
    assert len(fsdp_val) == 2 and set(fsdp_val) == set(single_val)
    for step, value in single_val.items():
        assert fsdp_val[step] == pytest.approx(value, rel=1e-5), step
    # The student's size is the sum of its shards, not rank 0's shard.
    params = {
        k: dict(series(read_metrics(d), "student/params")) for k, d in (("fsdp", run), ("one", tmp_path / "single"))
    }
    assert params["fsdp"] == params["one"] and params["one"]
    own = single["student"].state_dict()
    exported = load_file(run / "student" / "model.safetensors")
    # The gathered model: every tensor whole (a shard would be a flat fraction), none missing.
    assert {k for k in own if k != "lm_head.weight"} <= set(exported)
    for k, v in exported.items():
        assert v.shape == own[k].shape, k
        torch.testing.assert_close(v, own[k], rtol=1e-4, atol=1e-4)

    # Each rank holds about half the teacher's parameter bytes (FSDP pads each unit to a multiple of 2).
    held = {int(r): int(n) for r, n in re.findall(r"rank (\d) holds (\d+) bytes of the teacher", out)}
    whole = sum(p.numel() * p.element_size() for p in single["teacher"].parameters())
    assert set(held) == {0, 1}, out[-2000:]
    for n in held.values():
        assert 0.45 * whole <= n <= 0.55 * whole, (held, whole)


@pytest.mark.ddp
@pytest.mark.slow  # three 2-rank runs; the default suite writes and gathers FSDP checkpoints in the test above
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir):
    # The recipe's AdamW: its moments are in the checkpoint. (Lightning's FSDP loader cannot read the empty
    # optimizer state of plain SGD without momentum; no recipe uses it.)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train_cli(_fsdp(full), tmp_path, cache_dir)
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAtStep", "+callbacks.crash.step=3"]
    args = [sys.executable, str(ROOT / "train.py"), *_fsdp(cut, *crash)]
    args += [f"paths.cache_dir={cache_dir}", f"data.cache_dir={cache_dir}/data"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    died = subprocess.run(args, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert died.returncode != 0 and "simulated crash at step 3" in died.stdout + died.stderr
    assert (cut / "checkpoints" / "last.ckpt").is_file() and not (cut / "student").exists()
    run_train_cli(_fsdp(cut), tmp_path, cache_dir)  # resume=auto picks up the step-2 checkpoint
    assert_same_losses(full, cut, steps=4)
    a, b = load_file(full / "student" / "model.safetensors"), load_file(cut / "student" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stage", ["prune", "share", "lowrank", "sparsity", "qat"])
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_sim", "deepspeed_stage_3"])
def test_compression_under_sharding_is_refused_at_start_up_naming_the_strategy(stage, strategy):
    from tests.conftest import compose_cfg

    cfg = compose_cfg([f"trainer={strategy}", f"callbacks={stage}"], Path("/tmp/unused"), Path("/tmp/unused"))
    with pytest.raises(
        ConfigError, match=rf"callbacks\.{stage}.*not supported under the {strategy.split('_stage')[0]}"
    ):
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)
    cfg = compose_cfg(["trainer=ddp_sim", f"callbacks={stage}"], Path("/tmp/unused"), Path("/tmp/unused"))
    check_sharded_callbacks(cfg.trainer, cfg.callbacks)  # every DDP rank holds the whole student: allowed


def test_zero3_refuses_an_export_it_cannot_gather():
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["trainer=deepspeed_stage_3"], Path("/tmp/unused"), Path("/tmp/unused"))
    with pytest.raises(ConfigError, match=r"export\.enabled.*ZeRO-3.*trainer=fsdp"):
        check_sharded_callbacks(cfg.trainer, cfg.callbacks, leaves_training=True)
    check_sharded_callbacks(cfg.trainer, cfg.callbacks, leaves_training=False)
    cfg = compose_cfg(["trainer=fsdp_sim"], Path("/tmp/unused"), Path("/tmp/unused"))
    check_sharded_callbacks(cfg.trainer, cfg.callbacks, leaves_training=True)  # FSDP's student is gathered


def test_models_built_empty_keep_their_tied_embeddings():
    from distill.runtime.rank_zero_load import empty_weights, tie_again
    from tests.helpers import tiny_llama

    with empty_weights():
        model = tiny_llama()  # tied embeddings
    assert model.lm_head.weight.is_meta and model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers real
    tie_again(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
