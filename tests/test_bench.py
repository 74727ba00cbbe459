"""The bench scripts: each is a Hydra entry point with a root config in conf/bench, and starts."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from distill.config import ConfigError
from tests.conftest import CONF, ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))


def bench_cfg(name: str, overrides: list[str]) -> DictConfig:
    """``conf/bench/<name>.yaml`` composed as ``python bench/<name>.py <overrides>`` would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=f"bench/{name}", overrides=overrides, return_hydra_config=True)


def test_bench_scripts_are_the_expected_ones():
    assert SCRIPTS == [
        "baselines",
        "chunked_loss",
        "cliff",
        "headline",
        "prune_heal",
        "qat_vs_ptq",
        "share_lowrank",
        "step_time",
        "teacher_cache",
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports_and_composes_its_root_config(name):
    module = importlib.import_module(f"bench.{name}")  # every import resolves against the package layout
    assert "argparse" not in (ROOT / "bench" / f"{name}.py").read_text()
    assert f'config_name="bench/{name}"' in (ROOT / "bench" / f"{name}.py").read_text()
    assert callable(module.run)
    cfg = bench_cfg(name, [])
    # Hydra's record goes under logs/bench/<name>/runs, and the job stays in the launch directory.
    assert cfg.hydra.run.dir.endswith(f"/logs/bench/{name}/runs/{cfg.run_name}")
    assert cfg.hydra.job.chdir is False
    assert f"python bench/{name}.py" in (CONF / "bench" / f"{name}.yaml").read_text()


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("prune_heal", [], r"^base=None: required: python bench/prune_heal.py base="),
        ("prune_heal", ["base=/no/such/run"], r"^base='/no/such/run': no config.json there"),
        ("share_lowrank", ["configs=[student,nope]"], r"^configs=\['nope'\]: choose from student, share_k2,"),
        ("qat_vs_ptq", ["scheme=int3"], r"^scheme='int3': unknown quantization scheme; choose one of"),
        ("qat_vs_ptq", ["scheme=int8_weight_only", "group_size=32"], r"^group_size=32: int8_weight_only"),
    ],
)
def test_bad_bench_settings_fail_before_any_model_loads(name, overrides, message, tmp_path):
    run = importlib.import_module(f"bench.{name}").run
    with pytest.raises(ConfigError, match=message):
        run(bench_cfg(name, [*overrides, f"out={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def _bench(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chunked_loss.py"), *args],
        cwd=root,
        env={**os.environ, "DISTILL_ROOT": str(root)},
        text=True,
        capture_output=True,
        timeout=600,
    )


@pytest.mark.slow  # three Python processes (about 35 s); the configs of every script are composed in the default suite
def test_chunked_loss_measures_both_variants_in_subprocesses(tmp_path):
    proc = _bench(["vocab=4096", "hidden=64", "tokens=256", "chunk=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["naive", "chunked"]
    assert "V=4096 d=64 B·T=256 chunk=64 loss=forward_kl" in lines
    diff = float(re.search(r"loss relative difference = (\S+)", proc.stdout).group(1))
    assert diff < 1e-5  # the same loss, computed two ways
    assert float(re.search(r"ratio peak_memory chunked/naive = (\S+)", proc.stdout).group(1)) > 0
    # One Hydra record per call, each variant's inside it (the override that picked it included).
    (record,) = (tmp_path / "logs" / "bench" / "chunked_loss" / "runs").iterdir()
    for variant in ("naive", "chunked"):
        assert f"- variant={variant}" in (record / variant / ".hydra" / "overrides.yaml").read_text()

    proc = _bench(["loss=kl"], tmp_path)  # refused before any subprocess starts
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: loss='kl': unknown loss; choose one of forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tvd"
    )
