"""``trainer=deepspeed_sim``: Lightning's DeepSpeed ZeRO-3 path with 2 CPU ranks over gloo, end to end.

The partitioned student is gathered before it leaves training (distill.runtime.gather.zero3_state_dict), so
the export is the whole, trained model: it must equal a 1-process run that sees the same global batches. Each
rank holds about half the teacher, and a run killed mid-way resumes from DeepSpeed's checkpoint folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    SGD,
    SIM_RUN,
    assert_killed_run_resumes,
    assert_sharded_run_matches,
    read_metrics,
    run_train_cli,
    series,
)
from train import train

pytest.importorskip("deepspeed")  # a dev dependency: installed by `make test`

COMMON = SIM_RUN


def _zero3(run: Path, *extra: str) -> list[str]:
    return [*COMMON, "trainer=deepspeed_sim", "data.batch_size=2", f"hydra.run.dir={run}", *extra]


@pytest.mark.ddp
@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_two_zero_ranks_export_the_student_of_one_process_with_twice_the_batch(stage, tiny_cfg, tmp_path, cache_dir):
    run = tmp_path / f"zero{stage}"
    tied = "student.tie_word_embeddings=true"
    proc = run_train_cli(_zero3(run, *SGD, tied, f"trainer.strategy.stage={stage}"), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "verified the export" in out
    # ZeRO-3 partitions the student and gathers it for the export; ZeRO-2 never partitions parameters.
    assert ("gathered the sharded student on rank 0" in out) == (stage == 3)
    single_cfg = tiny_cfg(*COMMON[1:], *SGD, tied, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    # A ZeRO-3 placeholder counts as its whole parameter in student/params (not 0, not a partition).
    assert_sharded_run_matches(run, tmp_path / "single", single, out, half_teacher=stage == 3)


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s of 2-rank ZeRO-3; the fp32 ZeRO-3 equality runs in the default suite
def test_zero3_in_bf16_exports_the_fp32_master_weights(tmp_path, cache_dir):
    # The engine trains bf16 copies and keeps fp32 masters in the optimizer; the gather must return the masters.
    run = tmp_path / "bf16"
    probe = "+callbacks.probe._target_=tests.helpers.DtypeProbe"
    proc = run_train_cli(_zero3(run, "trainer.precision=bf16-mixed", probe), tmp_path, cache_dir)
    assert "rank 0 student trains in torch.bfloat16" in proc.stdout + proc.stderr
    weights = load_file(run / "student" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    total = sum(v.numel() for v in weights.values())
    off_grid = sum(int((v != v.to(torch.bfloat16).float()).sum()) for v in weights.values())
    assert off_grid > 0.9 * total  # fp32 values, not bf16 ones widened (measured: 99.9 %)


@pytest.mark.ddp
@pytest.mark.slow  # three 2-rank runs; the default suite trains and gathers under ZeRO-3 in the test above
@pytest.mark.parametrize("stage", [3, 2])
def test_a_killed_zero_run_resumes_from_its_deepspeed_checkpoint_folder(stage, tmp_path, cache_dir):
    def args(run: Path, *extra: str) -> list[str]:
        return _zero3(run, f"trainer.strategy.stage={stage}", *extra)

    checkpoints = assert_killed_run_resumes(args, tmp_path, cache_dir)
    # DeepSpeed writes each checkpoint as a folder named like Lightning's file; resume=auto found it.
    assert (checkpoints / "last.ckpt" / "latest").is_file()


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s each; QAT under DDP and under FSDP runs in the default suite
@pytest.mark.parametrize("stage", ["qat", "share"])
def test_compression_under_zero2_exports_what_one_process_exports(stage, tiny_cfg, tmp_path, cache_dir):
    # ZeRO-2 keeps every parameter whole on every rank, so the compression callbacks run as under DDP.
    # (Low-rank is left out: its ranks come from calibration batches, which differ between 2 ranks of batch
    # 2 and one process of batch 4; pruning is refused under DeepSpeed at fit start.)
    run = tmp_path / "zero2"
    settings = {"qat": [], "share": ["student.num_layers=2", "callbacks.share.pattern=all"]}
    extra = [*SGD, f"callbacks={stage}", *settings[stage]]
    run_train_cli(_zero3(run, "trainer.strategy.stage=2", *extra), tmp_path, cache_dir)
    single_cfg = tiny_cfg(*COMMON[1:], *extra, "data.batch_size=4", output_dir=tmp_path / "single")
    train(single_cfg)
    a = load_file(run / "student" / "model.safetensors")
    b = load_file(tmp_path / "single" / "student" / "model.safetensors")
    assert set(a) == set(b)
    off = {k: int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a}
    if stage == "qat":
        # The export holds the int4 grid values: a weight that ends 1e-7 from a rounding boundary in one run
        # lands one grid step away in the other (0.15 % of the weights here, the same under ddp_sim).
        assert sum(off.values()) < 0.01 * sum(v.numel() for v in a.values()), off
    else:
        assert not any(off.values()), off
    two, one = (dict(series(read_metrics(d), "val/loss")) for d in (run, tmp_path / "single"))
    assert len(two) == 2 and two == pytest.approx(one, rel=1e-4)


@pytest.mark.ddp
@pytest.mark.slow  # a 2-rank run (~75 s on 2 cores)
def test_wall_clock_lr_under_zero2_scales_and_restores_the_rate(tmp_path, cache_dir):
    # DeepSpeed's ZeRO optimizer has no step hooks (the callback died with AttributeError at the first batch).
    # StepLR chains on the current rate, so a factor left in place after a step would compound in the next rate.
    run = tmp_path / "zero2_lr"
    args = [
        "trainer.strategy.stage=2",
        "+callbacks.wall_clock_lr._target_=callbacks.wall_clock_lr.WallClockCosine",
        "~distill.scheduler",
        "+distill.scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 0.5}",
    ]
    run_train_cli(_zero3(run, *args), tmp_path, cache_dir)
    rates = [v for _, v in series(read_metrics(run), "train/lr")]
    steps = 4  # SIM_RUN's trainer.max_steps
    want = [1e-3 * 0.5**s * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    assert rates == pytest.approx(want, rel=1e-5)
