"""How a benchmark runs a training recipe: composed in-process (:func:`compose_train`) or as a run folder of its own.

In-process studies compose ``conf/train.yaml`` with their overrides and call ``train.py``'s ``train(cfg)``;
runs whose report is kept (the headline rows) run ``python train.py`` in a subprocess (:func:`run_recipe`), so
their wall-clock time is one whole run's. Both go through this module, so every benchmark composes a recipe the
same way: from the checkout's ``conf/``, Hydra's logging left alone (``debug=quiet``), its files under ``out``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from bench import ROOT


def compose_train(overrides: Sequence[str], out: Path | str | None, quiet: bool = True) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, writing its logs and outputs under ``out`` (None: as composed).

    ``quiet`` adds ``debug=quiet`` first (no progress bar, no per-step logging), so a study's own overrides can
    still turn either back on.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*(["debug=quiet"] if quiet else []), *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        if out is not None:
            cfg.paths.log_dir = cfg.paths.output_dir = str(out)
    return cfg


def run_dir(runs_root: Path, recipe: str) -> Path:
    """Where ``recipe``'s headline run lives."""
    return runs_root / f"headline_{recipe}"


def run_recipe(
    recipe: str, runs_root: Path, force: bool, overrides: list[str] | None = None, name: str | None = None
) -> None:
    """Run one recipe to completion unless a finished report already exists (``force`` starts it over).

    The run is ``python train.py experiment=<recipe> run_name=<name>`` (``headline_<recipe>`` by default),
    so it lives in ``runs_root/<name>``.
    """
    # The datasets cache and the teacher are shared, so each run's wall-clock time is its own.
    name = name or run_dir(runs_root, recipe).name
    folder = runs_root / name
    if (folder / "report.json").exists() and not force:
        print(f"{name}: report exists, skipped (force=true reruns it)", flush=True)
        return
    if folder.exists():
        shutil.rmtree(folder)  # a half-finished or forced run starts over, so its time is one whole run
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={recipe}", f"run_name={name}"]
    cmd += ["callbacks.progress_bar=null", *(overrides or [])]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"{name}: done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
