"""Importance statistics summed over ranks step by step, so a checkpoint (rank 0's) holds every rank's share."""

from __future__ import annotations

import torch

from distill.compress.prune.importance import ImportanceAccumulator


def _ranks(*batches: list[float]) -> list[ImportanceAccumulator]:
    ranks = []
    for values in batches:
        acc = ImportanceAccumulator("activation", layers=False)
        acc._add("channel.0", torch.tensor(values), 2)
        ranks.append(acc)
    return ranks


def _all_reduce(ranks: list[ImportanceAccumulator]) -> None:
    """Each rank's reduce, with an in-place sum over the ranks' tensors as a gloo all-reduce does."""
    # reduce() asks for the keys in sorted order, the sum then the count of each.
    order = [(k, part) for k in sorted(ranks[0]._local) for part in (0, 1)]
    pending = [dict(r._local) for r in ranks]
    for i, rank in enumerate(ranks):
        others = iter([sum(p[k][part] for j, p in enumerate(pending) if j != i) for k, part in order])
        rank.reduce(lambda t, others=others: t.add_(next(others)))  # in place, like dist.all_reduce


def test_reduce_sums_only_what_was_added_since_the_last_one_and_survives_in_place_reducers():
    ranks = _ranks([1.0, 2.0], [3.0, 4.0])
    _all_reduce(ranks)
    for rank in ranks:  # every rank holds the total of both, counted once
        torch.testing.assert_close(rank.sums["channel.0"], torch.tensor([4.0, 6.0], dtype=torch.float64))
        assert float(rank.counts["channel.0"]) == 4.0
    for rank, values in zip(ranks, ([10.0, 0.0], [0.0, 20.0]), strict=True):
        rank._add("channel.0", torch.tensor(values), 1)
    _all_reduce(ranks)
    for rank in ranks:  # the second step adds only the new statistics, not the first step's again
        torch.testing.assert_close(rank.sums["channel.0"], torch.tensor([14.0, 26.0], dtype=torch.float64))
        assert float(rank.counts["channel.0"]) == 6.0
    restored = ImportanceAccumulator("activation", layers=False)
    restored.load_state_dict(ranks[0].state_dict())  # what a resumed run reads from rank 0's checkpoint
    restored.reduce(lambda t: t * 2)  # nothing new since: no sum is counted twice
    torch.testing.assert_close(restored.sums["channel.0"], ranks[1].sums["channel.0"])
