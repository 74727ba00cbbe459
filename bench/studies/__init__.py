"""Code the benchmarks share that is no part of the library: the baselines every recipe is shown next to."""
