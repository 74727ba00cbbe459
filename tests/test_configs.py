"""Every config composes, and every ``_target_`` in it resolves and instantiates."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from lightning.pytorch import Trainer
from omegaconf import OmegaConf, open_dict

from distill.config import instantiate_callbacks, instantiate_loggers
from distill.recipe.strategies import is_gpu_only
from tests.conftest import CONF, compose_cfg

# bench/: the scripts' roots; conf is a package too (it ships in the wheel), so Python may leave a __pycache__.
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("bench", "__pycache__"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _targets(node: object, path: str = "") -> list[tuple[str, str]]:
    """Every (key path, _target_) in a plain container."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                found.append((path, v))
            else:
                found += _targets(v, f"{path}.{k}" if path else str(k))
    return found


def test_groups_are_the_documented_ones():
    assert set(GROUPS) >= {
        "teacher",
        "student",
        "data",
        "distill",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "hydra",
        "experiment",
        "debug",
    }
    assert set(_options("trainer")) >= {"cpu", "gpu", "ddp", "ddp_sim"}
    assert set(_options("teacher")) >= {"smollm2", "llama", "tiny_random"}
    assert set(_options("student")) >= {"tiny", "from_teacher"}
    assert set(_options("data")) >= {"embedded", "text", "hub"}
    assert set(_options("logger")) >= {"csv", "wandb", "tensorboard"}


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS if g not in ("paths", "hydra") for o in _options(g)]
)
def test_every_option_composes_and_its_targets_resolve(group, option, tmp_path, cache_dir):
    cfg = compose_cfg([f"{group}={option}"], tmp_path, cache_dir)
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    targets = _targets(tree)
    assert any(p.startswith("trainer") for p, _ in targets)
    for path, target in targets:
        assert hydra.utils.get_object(target) is not None, f"{path}._target_={target}"


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs_instantiate(option, tmp_path, cache_dir):
    cfg = compose_cfg([f"trainer={option}"], tmp_path, cache_dir)
    if is_gpu_only(cfg.trainer.get("strategy")):
        # Lightning refuses FSDP/DeepSpeed on a CPU accelerator; build the strategy object itself instead
        # (test_scale_out.py checks its settings and the clear error for accelerator=cpu).
        assert hydra.utils.instantiate(cfg.trainer.strategy) is not None
        return
    with open_dict(cfg):  # GPU configs must also be valid Trainer arguments; build them on the CPU here
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        if str(cfg.trainer.get("precision")).startswith("bf16"):
            cfg.trainer.precision = "bf16-mixed"
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, Trainer) and trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_configs_instantiate(option, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg([f"logger={option}"], tmp_path, cache_dir)
    loggers = instantiate_loggers(cfg.logger)
    assert len(loggers) == (0 if option == "none" else 1)


@pytest.mark.parametrize("option", _options("callbacks"))
def test_callback_configs_instantiate(option, tmp_path, cache_dir):
    cfg = compose_cfg([f"callbacks={option}"], tmp_path, cache_dir)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    assert len(callbacks) == len(cfg.get("callbacks") or {})


def test_models_data_and_objective_instantiate(tmp_path, cache_dir, tiny_teacher):
    cfg = compose_cfg(["teacher=tiny_random"], tmp_path, cache_dir)
    teacher = hydra.utils.instantiate(cfg.teacher)
    for option in ("tiny", "from_teacher"):
        c = compose_cfg([f"student={option}", "student.num_layers=1"], tmp_path, cache_dir)
        student = hydra.utils.instantiate(c.student, teacher=teacher)
        assert student.config.num_hidden_layers == 1
    for option in ("embedded",):
        dm = hydra.utils.instantiate(
            compose_cfg([f"data={option}"], tmp_path, cache_dir).data, tokenizer=teacher.tokenizer
        )
        assert dm.block_size == 128
    obj = hydra.utils.instantiate(cfg.distill.objective)
    assert obj.loss_name == "forward_kl"
    opt = hydra.utils.instantiate(cfg.distill.optimizer)
    sched = hydra.utils.instantiate(cfg.distill.scheduler)
    import torch

    o = opt(params=[torch.nn.Parameter(torch.zeros(1))])
    assert sched(optimizer=o) is not None


def test_hub_data_offline_gives_clear_error(tmp_path, cache_dir, tiny_teacher):
    from distill.config import ConfigError

    cfg = compose_cfg(["data=hub", "data.name=no-such/dataset-xyz"], tmp_path, cache_dir)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tiny_teacher.tokenizer)
    with pytest.raises(ConfigError, match=r"data.name='no-such/dataset-xyz': could not load it"):
        dm.setup()


def test_root_config_documents_the_command(tmp_path):
    head = (CONF / "train.yaml").read_text().splitlines()[0]
    assert head.startswith("#")
    for f in Path(CONF).rglob("*.yaml"):
        if f.parent.name in ("paths", "hydra", "callbacks") or f.name == "default.yaml":
            continue
        text = f.read_text()
        commands = (
            "python train.py",
            "python evaluate.py",
            "python -m distill.",
            "python -m bench.",
            "python -m slurm.",
        )
        assert any(cmd in text for cmd in commands), f"{f} lacks a header comment with its command"
