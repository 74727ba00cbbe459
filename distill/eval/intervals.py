"""Confidence intervals for per-example scores: a seeded percentile bootstrap of the mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Resamples are drawn this many at a time, so a large task (MMLU: ~14k examples) never needs a
# resamples x n index matrix in memory at once.
_CHUNK = 100


def bootstrap_interval(
    values: Sequence[float], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap interval for the mean of ``values``.

    The examples are resampled with replacement ``resamples`` times and the interval is the central
    ``confidence`` share of the resampled means. The seed is fixed so the same scores always give the
    same interval: a report must not change when nothing it measures has.

    Args:
        values: one score per example (0/1 for accuracy).
        resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; both equal the value when every example scored the same.

    Raises:
        ValueError: on no values, a non-positive ``resamples`` or a ``confidence`` outside (0, 1).

    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty list of scores, got shape {data.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        idx = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
