"""``trainer=deepspeed_sim``: Lightning's DeepSpeed ZeRO-3 path with 2 CPU ranks over gloo, end to end.

The partitioned student is gathered before it leaves training (distill.runtime.gather.zero3_state_dict), so
the export is the whole, trained model: it must equal a 1-process run that sees the same global batches. Each
rank holds about half the teacher, and a run killed mid-way resumes from DeepSpeed's checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SGD, SIM_RUN, assert_killed_run_resumes, assert_sharded_run_matches, run_train_cli
from train import train

pytest.importorskip("deepspeed")  # a dev dependency: installed by `make test`

COMMON = SIM_RUN


def _zero3(run: Path, *extra: str) -> list[str]:
    return [*COMMON, "trainer=deepspeed_sim", "data.batch_size=2", f"hydra.run.dir={run}", *extra]


@pytest.mark.ddp
def test_two_zero3_ranks_export_the_gathered_student_of_one_process_with_twice_the_batch(tiny_cfg, tmp_path, cache_dir):
    run = tmp_path / "zero3"
    tied = "student.tie_word_embeddings=true"
    proc = run_train_cli(_zero3(run, *SGD, tied), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "gathered the sharded student on rank 0" in out and "verified the export" in out
    single_cfg = tiny_cfg(*COMMON[1:], *SGD, tied, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)

    # A ZeRO-3 placeholder counts as its whole parameter in student/params (not 0, not a partition).
    assert_sharded_run_matches(run, tmp_path / "single", single, out)


@pytest.mark.ddp
@pytest.mark.slow  # three 2-rank runs; the default suite trains and gathers under ZeRO-3 in the test above
def test_a_killed_zero3_run_resumes_from_its_deepspeed_checkpoint_folder(tmp_path, cache_dir):
    checkpoints = assert_killed_run_resumes(_zero3, tmp_path, cache_dir)
    # DeepSpeed writes each checkpoint as a folder named like Lightning's file; resume=auto found it.
    assert (checkpoints / "last.ckpt" / "latest").is_file()
