"""Shared fixtures: composed configs shrunk to tiny models, and a tiny teacher."""

from __future__ import annotations

import os

# Tests never touch the network: fail fast instead of retrying the hub for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models, whose ops are too small to split across threads: one thread per process (and per
# subprocess a test starts) avoids the thread pool's overhead, which dominates at these sizes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (tiny tokenizer, tokenised data) for the whole session."""
    return tmp_path_factory.mktemp("cache")


def compose_cfg(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``python train.py <overrides>`` would, with paths under tmp.

    Overrides that name no recipe compose the bare defaults (``~experiment``), not the default run's
    recipe (``experiment=qad_q4_mix``): those tests are about one config group at a time.
    """
    if not any(o.lstrip("+~").startswith("experiment") for o in overrides):
        overrides = ["~experiment", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.data.cache_dir = str(cache_dir / "data")
    return cfg


TINY = [
    "experiment=smoke",
    "distill.optimizer.lr=0.01",
    "distill.scheduler.num_warmup_steps=0",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
]


@pytest.fixture
def tiny_cfg(tmp_path: Path, cache_dir: Path):
    """Factory: a tiny-teacher, tiny-student config with extra overrides."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg([*TINY, *overrides], output_dir or tmp_path, cache_dir)

    return make


@pytest.fixture(scope="session")
def tiny_teacher(cache_dir: Path):
    """The tiny_random teacher (2 layers, width 64, 512-token BPE)."""
    from distill.models.teacher import random_teacher

    return random_teacher(cache_dir=cache_dir)
