"""A resumable, rank-aware batch sampler for step-based runs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Batches for a step-based run whose order depends only on the seed and the global batch index.

    Global batch ``k`` holds stream positions ``[k·G, (k+1)·G)`` with ``G = batch_size × world_size``; the
    stream walks a fresh seeded permutation of the data on each pass. Rank ``r`` takes its slice of
    the global batch, so 2 ranks × batch b see exactly what 1 rank × batch 2b sees. Resuming at batch
    ``start`` yields the same batches an uninterrupted run would have yielded from there. ``len()`` is
    the whole run, because Lightning counts the batches already done when it restarts mid-epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        total_batches: int,
        *,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        self.n, self.batch_size, self.total = num_samples, batch_size, total_batches
        self.seed, self.world_size, self.rank, self.start = seed, world_size, rank, start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _at(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][pos])

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world_size
        for k in range(self.start, self.total):
            first = k * g + self.rank * self.batch_size
            yield [self._at(first + j) for j in range(self.batch_size)]

    def __len__(self) -> int:
        return self.total


class EvalBatchSampler(Sampler[list[int]]):
    """Validation batches split across ranks so that together they are exactly one process's batches.

    One process validates batches ``0..n-1`` of the set in order, or in ``order`` (``n`` capped by an integer
    ``limit_batches``); rank ``r`` of ``W`` takes batches ``r, r+W, ...``. Ranks left one batch short get a
    padding batch so that every rank runs the same number of forwards (under FSDP each forward is a
    collective: a rank that stops early hangs the others). A padding batch repeats batch 0's rows at indices
    shifted by ``num_samples``; :class:`PaddedEvalSet` serves them with every label ignored, so they weigh
    nothing in the token-weighted validation metrics.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        limit_batches: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        order: list[int] | None = None,
    ) -> None:
        # ``order``: the rows in the order to read them (a spread over documents), else 0..n-1.
        rows = list(range(num_samples)) if order is None else list(order)
        batches = [rows[s : s + batch_size] for s in range(0, num_samples, batch_size)]
        if limit_batches is not None:
            batches = batches[:limit_batches]
        own = batches[rank::world_size]
        per_rank = -(-len(batches) // world_size)  # ceil
        padding = [[num_samples + i for i in batches[0]]] if batches else []
        self.batches = own + padding * (per_rank - len(own))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


class PaddedEvalSet(torch.utils.data.Dataset):
    """A validation set whose indices past its end are padding rows (see :class:`EvalBatchSampler`)."""

    def __init__(self, rows: torch.utils.data.Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        if index < n:
            return {**self.rows[index], "block": torch.tensor(index)}
        return {**self.rows[index - n], "block": torch.tensor(index - n), "padding": torch.tensor(True)}


class IndexedSet(torch.utils.data.Dataset):
    """Training rows that carry their own index (``distill.generation.teacher_cache`` looks continuations up by it)."""

    def __init__(self, rows: torch.utils.data.Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.rows[index], "index": torch.tensor(index)}
