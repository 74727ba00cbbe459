"""bench/teacher_cache.py's crossover: the epochs from which a cache built once beats the live teacher."""

from __future__ import annotations

import json
import math

import pytest

from bench import teacher_cache
from tests.test_bench import bench_cfg


class _Data:
    train_set = range(100)  # one epoch: 100 blocks


def test_crossover_scales_the_measured_blocks_to_an_epoch_and_divides_the_build_by_the_saving():
    c = teacher_cache.crossover(build=10.0, live=4.0, lookup=1.0, blocks=10, dm=_Data())
    assert (c["build_per_epoch_s"], c["live_per_epoch_s"], c["lookup_per_epoch_s"]) == (100.0, 40.0, 10.0)
    assert c["epochs"] == pytest.approx(100 / 30)
    # Lookups as slow as the teacher: the cache never pays for itself.
    assert math.isinf(teacher_cache.crossover(build=1.0, live=1.0, lookup=1.0, blocks=10, dm=_Data())["epochs"])


@pytest.mark.slow  # a tiny teacher over 8 blocks, two caches, timed passes (about 20 s on 2 loaded cores)
def test_the_bench_measures_the_crossover_per_k_on_the_same_blocks(cache_dir, capsys, tmp_path):
    overrides = ["teacher=tiny_random", f"paths.cache_dir={cache_dir}", "blocks=8", "block=32", "ks=[4,16]"]
    overrides.append(f"json={tmp_path / 'teacher_cache.json'}")
    rows = teacher_cache.run(bench_cfg("teacher_cache", [*overrides, "batch=4", "chunk=16", "repeats=1"]))
    assert set(rows) == {4, 16}
    for m in rows.values():
        c = m["crossover"]
        assert c["live_per_epoch_s"] > 0 and c["lookup_per_epoch_s"] > 0 and c["build_per_epoch_s"] > 0
        saved = c["live_per_epoch_s"] - c["lookup_per_epoch_s"]
        assert c["epochs"] == (c["build_per_epoch_s"] / saved if saved > 0 else math.inf)
    assert "crossover, E* = B / (L - R)" in capsys.readouterr().out
    written = json.loads((tmp_path / "teacher_cache.json").read_text())
    assert written["ks"]["16"]["crossover"]["epochs"] == rows[16]["crossover"]["epochs"]
    table = (tmp_path / "teacher_cache.md").read_text()
    assert f"| 16 | {rows[16]['bytes_per_token']:.1f} |" in table
