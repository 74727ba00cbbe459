"""Distil a teacher LLM into a student: ``python train.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill.compress.stages import CompressionStage, check_schedule, compression_stages
from distill.config import build, exit_on_config_error, instantiate_loggers, named_callbacks
from distill.eval.assess import assess
from distill.eval.tasks import validate_task_names
from distill.export.hf import export_compact_forms, export_student, plain_model
from distill.module import DistillModule
from distill.runtime.paths import export_root
from distill.runtime.resume import resolve_resume
from distill.runtime.strategies import apply_student_switches, check_trainer_config, strategy_name
from distill.runtime.tracking import publish_student

log = logging.getLogger("distill")


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one distillation: build everything from ``cfg``, fit, export the student, evaluate.

    Returns:
        ``(metrics, objects)``: the final logged and held-out metrics, and the objects built
        (teacher, student, module, datamodule, trainer) for callers such as tests.

    """
    # Settings that can be checked without models come first, so a typo fails before a slow teacher load.
    check_trainer_config(cfg.trainer, objective=cfg.distill.objective)  # e.g. FSDP on CPU, before any load
    ckpt_path = resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir) / "checkpoints")
    objective = build(cfg.distill.objective)
    if cfg.eval.enabled:
        validate_task_names(cfg.eval.tasks or [])
    if strategy_name(cfg.trainer.get("strategy")) == "fsdp" and objective.chunked == "auto":
        objective.chunked = False  # the chunked path needs the whole output layer; FSDP shards it (docs/performance.md)
    pl.seed_everything(cfg.seed, workers=True)
    teacher = build(cfg.teacher)
    student = build(cfg.student, teacher=teacher)
    apply_student_switches(student, cfg.get("trainer_extras"))  # activation checkpointing, torch.compile
    objective.attach(student.config, teacher.config)
    datamodule = build(cfg.data, tokenizer=teacher.tokenizer)
    if hasattr(teacher, "check_data"):  # a cached teacher only fits the data it was built from
        datamodule.setup()
        teacher.check_data(datamodule.cache_path.name, datamodule.block_size)
    module = DistillModule(
        teacher,
        student,
        objective,
        optimizer=build(cfg.distill.optimizer),
        scheduler=build(cfg.distill.scheduler) if cfg.distill.get("scheduler") else None,
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = named_callbacks(cfg.get("callbacks"))
    stages = compression_stages(callbacks.values())
    check_schedule(stages)
    # Lightning calls callbacks in list order; compression stages run in STAGES order, so none waits on another.
    others = [cb for cb in callbacks.values() if cb not in stages]
    trainer: pl.Trainer = build(cfg.trainer, callbacks=[*others, *stages], logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - started  # this process only: a resumed run counts its own part

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    objects = {"teacher": teacher, "student": student, "module": module, "datamodule": datamodule, "trainer": trainer}
    if not trainer.is_global_zero or trainer.fast_dev_run:
        return metrics, objects
    if cfg.export.enabled:
        out = export_student(
            plain_model(student, stages),  # shared/factorised/quantized weights made plain
            teacher.tokenizer,
            cfg.export.dir,
            verify=cfg.export.verify,
            metadata={"teacher": teacher.identity, "structure": module.structure, "global_step": trainer.global_step},
        )
        objects["export_dir"] = out
        publish_student(loggers, out)  # W&B: the export as a model artifact
        log.info("exported the student to %s", out)
        for name, path in export_compact_forms(student, teacher.tokenizer, stages, cfg.paths.output_dir).items():
            log.info("%s wrote a compact export to %s", name, path)
    if cfg.eval.enabled:
        device = next(student.parameters()).device
        teacher.to(device)
        report = assess(
            student,
            teacher,
            teacher.tokenizer,
            datamodule.val_dataloader(),
            module.vocab_size,
            cfg.eval,
            cfg.paths.output_dir,
            export_dir=objects.get("export_dir"),
            modifications=modifications(cfg, module, trainer.global_step, callbacks),
            config=OmegaConf.to_container(cfg, resolve=True),
            names=(teacher.name, "student"),
            run={
                "recipe": cfg.get("recipe"),
                "train_seconds": train_seconds,
                "steps": trainer.global_step,
                "resumed_from": str(ckpt_path) if ckpt_path else None,
                "run_dir": str(cfg.paths.output_dir),
            },
        )
        flat = {_side_key(k, side): v for side, values in report["metrics"].items() for k, v in values.items()}
        metrics.update(flat)
        _log_report(report, flat, loggers, trainer.global_step)
        objects["report"] = report
    return metrics, objects


def _side_key(key: str, side: str) -> str:
    group, _, rest = key.partition("/")
    return f"{group}/{side}/{rest}"


def modifications(
    cfg: DictConfig, module: DistillModule, steps: int, callbacks: dict[str, Any]
) -> list[dict[str, Any]]:
    """What was done to the student, in order: distillation, each recorded structure change, each compression stage."""
    container = OmegaConf.to_container(cfg, resolve=True)
    mods: list[dict[str, Any]] = [
        {
            "kind": "distillation",
            "config": {
                "teacher": container["teacher"],
                "student": container["student"],
                "objective": container["distill"]["objective"],
                "optimizer": container["distill"]["optimizer"],
                "steps": steps,
            },
        }
    ]
    mods += [{"kind": c["kind"], "config": c["spec"]} for c in module.structure]
    for name, cb in callbacks.items():
        if isinstance(cb, CompressionStage):
            mods.append({"kind": f"callback:{name}", "config": container["callbacks"][name]})
    return mods


@rank_zero_only
def _log_report(report: dict[str, Any], flat: dict[str, float], loggers: list, step: int) -> None:
    for lg in loggers:
        lg.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=step)
        if hasattr(lg, "log_table"):  # W&B: the comparison as a table
            rows = [[r["metric"], r["teacher"], r["student"], r["delta"], r["rel_delta"]] for r in report["comparison"]]
            lg.log_table("report/comparison", columns=["metric", "teacher", "student", "delta", "rel_delta"], data=rows)
        lg.save()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the metric that sweeps optimise."""
    with exit_on_config_error():
        metrics, _ = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    export_root()
    main()
