"""The step batch sampler: resumable, and rank-sharded like one big batch."""

from __future__ import annotations

from distill.data.sampler import StepBatchSampler


def test_sampler_resume_yields_the_remaining_batches():
    full = list(StepBatchSampler(50, 4, 30, seed=3))
    resumed = list(StepBatchSampler(50, 4, 30, seed=3, start=12))
    assert resumed == full[12:]
    assert len(StepBatchSampler(50, 4, 30, seed=3, start=12)) == 30
    # batches walk a fresh permutation per pass over the data
    flat = [i for b in full for i in b]
    assert sorted(flat[:50]) == list(range(50)) and flat[:50] != flat[50:100]


def test_sampler_two_ranks_see_what_one_rank_sees_with_double_batch():
    one = list(StepBatchSampler(37, 6, 10, seed=1))
    r0 = list(StepBatchSampler(37, 3, 10, seed=1, world_size=2, rank=0))
    r1 = list(StepBatchSampler(37, 3, 10, seed=1, world_size=2, rank=1))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
