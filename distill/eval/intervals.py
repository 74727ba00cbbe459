"""Confidence intervals: a seeded percentile bootstrap of a mean, a ratio of sums, or any statistic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Resamples are drawn this many at a time, so a large task (MMLU: ~14k examples) never needs a
# resamples x n index matrix in memory at once.
_CHUNK = 100


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


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
    _check(resamples, confidence)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        idx = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def resample_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile-bootstrap interval for any statistic of ``n`` resampled units.

    ``statistic`` gets the indices of one resample (``n`` draws with replacement) and returns its value,
    so one call covers ratios of sums (tokens per held-out row differ), their transforms (perplexity is
    ``exp`` of a ratio) and paired differences between two models scored on the same units.

    Args:
        statistic: maps an index array of length ``n`` to the statistic of that resample.
        n: number of units (held-out rows, examples).
        resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling (fixed: the same scores always give the same interval).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: on no units, a non-positive ``resamples`` or a ``confidence`` outside (0, 1).

    """
    if n < 1:
        raise ValueError(f"resample_interval needs at least one unit, got n={n}")
    _check(resamples, confidence)
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)])
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    transform: Callable[[float], float] | None = None,
    **kwargs: float,
) -> tuple[float, float]:
    """A bootstrap interval for ``sum(numerators) / sum(denominators)``, resampling the units in pairs.

    Held-out metrics are means over tokens, but tokens within one sequence are not independent draws;
    resampling whole sequences (a cluster bootstrap) gives an honest width. ``transform`` maps the ratio
    (``math.exp`` turns a mean NLL into a perplexity); it must be monotone for the percentile interval to
    carry over. ``kwargs`` go to :func:`resample_interval`.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerators and denominators must be 1-D and of one length, got {num.shape} and {den.shape}")
    fn = transform or (lambda x: x)

    def stat(idx: np.ndarray) -> float:
        return fn(float(num[idx].sum() / max(den[idx].sum(), 1e-12)))

    return resample_interval(stat, num.size, **kwargs)
