"""Distil a teacher LLM into a student: ``python train.py [group=option ...] [key=value ...]``.

The recipe in four steps, each a function of :mod:`distill.recipe`: check the settings and build the models,
data and trainer; fit; export the student; evaluate it against the teacher and write the report.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import ConfigOrigin, exit_on_config_error
from distill.recipe.export import export_run, gguf_facts
from distill.recipe.report import assess_run, flat_metrics, log_report, split_heldout
from distill.recipe.setup import build_models, build_trainer, check_gguf, check_settings, gather_whole
from distill.runtime.clock import TrainClock
from distill.runtime.gather import is_sharded
from distill.runtime.lock import run_lock
from distill.runtime.paths import export_root

log = logging.getLogger("distill")


def train(cfg: DictConfig, origin: ConfigOrigin | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one distillation: build everything from ``cfg``, fit, export the student, evaluate.

    Args:
        cfg: the composed config.
        origin: which settings the user typed (``main`` passes it). A GGUF export the user did not ask for (the
            default run's) that this student cannot be written as is dropped with a warning instead of refused.
            None: every setting counts as asked for.

    Returns:
        ``(metrics, objects)``: the final logged and held-out metrics, and the objects built
        (teacher, student, module, datamodule, trainer) for callers such as tests.

    """
    # Set-up: every check that needs no model first, so a typo fails before the teacher loads.
    plan = check_settings(cfg)
    objects = build_models(cfg, plan)
    if "gguf" in plan.formats:
        check_gguf(cfg, objects, plan, origin)
    trainer, loggers, callbacks, stages = build_trainer(cfg)
    objects["trainer"] = trainer

    # Fit.
    if plan.ckpt_path:
        log.info("resuming from %s", plan.ckpt_path)
    clock = TrainClock.attach(trainer)  # training seconds across a resumed run's segments, kept in checkpoints
    trainer.fit(objects["module"], datamodule=objects["datamodule"], ckpt_path=plan.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.fast_dev_run:
        return metrics, objects
    if is_sharded(trainer.strategy.model):
        gather_whole(cfg, objects, trainer, stages)  # every rank joins; rank 0 goes on with the whole student
    held = split_heldout(cfg, objects, trainer)  # under DDP every rank scores its share of the held-out batches
    if not trainer.is_global_zero:
        return metrics, objects

    # Export.
    if cfg.export.enabled:
        objects["export_dir"], objects["artifact_dir"] = export_run(cfg, objects, stages, loggers, plan.formats)

    # Evaluate.
    if cfg.eval.enabled:
        facts = {
            "recipe": cfg.get("recipe"),
            "train_seconds": clock.total,  # every segment of a resumed run
            "train_seconds_segment": clock.segment,  # this process's part
            "steps": trainer.global_step,
            "resumed_from": str(plan.ckpt_path) if plan.ckpt_path else None,
            "run_dir": str(cfg.paths.output_dir),
            "artifact": str(objects["artifact_dir"]) if objects.get("artifact_dir") else None,
        }
        facts |= gguf_facts(objects.get("gguf"))
        report = assess_run(cfg, objects, callbacks, facts, held)
        flat = flat_metrics(report)
        metrics.update(flat)
        log_report(report, flat, loggers, trainer.global_step)
        objects["report"] = report
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the metric that sweeps optimise."""
    with exit_on_config_error(discard=cfg.paths.output_dir), run_lock(cfg.paths.output_dir):
        metrics, _ = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    export_root()
    main()
