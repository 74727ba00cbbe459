"""Distil a teacher LLM into a student: ``python train.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill import structure
from distill.checkpointing import resolve_resume
from distill.evaluation import format_table, heldout_metrics
from distill.export import export_compact_forms, export_student
from distill.instantiate import build, find_config_error, instantiate_callbacks, instantiate_loggers
from distill.module import DistillModule

log = logging.getLogger("distill")


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one distillation: build everything from ``cfg``, fit, export the student, evaluate.

    Returns:
        ``(metrics, objects)``: the final logged and held-out metrics, and the objects built
        (teacher, student, module, datamodule, trainer) for callers such as tests.

    """
    # Settings that can be checked without models come first, so a typo fails before a slow teacher load.
    ckpt_path = resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir) / "checkpoints")
    objective = build(cfg.distill.objective)
    pl.seed_everything(cfg.seed, workers=True)
    teacher = build(cfg.teacher)
    student = build(cfg.student, teacher=teacher)
    objective.attach(student.config, teacher.config)
    datamodule = build(cfg.data, tokenizer=teacher.tokenizer)
    module = DistillModule(
        teacher,
        student,
        objective,
        optimizer=build(cfg.distill.optimizer),
        scheduler=build(cfg.distill.scheduler) if cfg.distill.get("scheduler") else None,
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = build(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=loggers or False
    )
    structure.check_schedule(trainer.callbacks)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    objects = {"teacher": teacher, "student": student, "module": module, "datamodule": datamodule, "trainer": trainer}
    if not trainer.is_global_zero or trainer.fast_dev_run:
        return metrics, objects
    if cfg.export.enabled:
        out = export_student(
            student,
            teacher.tokenizer,
            cfg.export.dir,
            verify=cfg.export.verify,
            metadata={"teacher": teacher.identity, "structure": module.structure, "global_step": trainer.global_step},
        )
        objects["export_dir"] = out
        log.info("exported the student to %s", out)
        for name, path in export_compact_forms(
            student, teacher.tokenizer, trainer.callbacks, cfg.paths.output_dir
        ).items():
            log.info("%s wrote a compact export to %s", name, path)
    if cfg.eval.enabled:
        device = next(student.parameters()).device
        teacher.to(device)
        results = heldout_metrics(
            {"teacher": teacher, "student": student},
            teacher,
            datamodule.val_dataloader(),
            module.vocab_size,
            max_batches=cfg.eval.max_batches,
            device=device,
        )
        _report(results, loggers, trainer.global_step)
        metrics.update({f"heldout/{m}/{k}": v for m, r in results.items() for k, v in r.items()})
    return metrics, objects


@rank_zero_only
def _report(results: dict[str, dict[str, float]], loggers: list, step: int) -> None:
    print("\nHeld-out evaluation (validation split):\n" + format_table(results), flush=True)
    flat = {f"heldout/{m}/{k}": v for m, r in results.items() for k, v in r.items()}
    for lg in loggers:
        lg.log_metrics(flat, step=step)
        lg.save()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the metric that sweeps optimise."""
    try:
        metrics, _ = train(cfg)
    except Exception as err:
        config_err = find_config_error(err)
        if config_err is None:
            raise
        print(f"error: {config_err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
