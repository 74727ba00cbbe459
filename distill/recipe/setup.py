"""The set-up steps of a run (``train.py``): check the settings, build the models and data, build the trainer.

Settings that need no model are checked first (:func:`check_settings`), so a typo fails before a slow teacher
load; each check runs once, and what it found (the objective, the checkpoint to resume, the export formats) travels
in a :class:`Plan` to the steps that need it.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.compress.replay import rebuilt_student
from distill.compress.stages import CompressionStage, check_schedule, compression_stages
from distill.config import (
    ConfigError,
    ConfigOrigin,
    build,
    check_optimization,
    config_error,
    instantiate_loggers,
    named_callbacks,
)
from distill.data.generation import Generation
from distill.data.named_sets import check_sets
from distill.eval import llama_cpp
from distill.eval.tasks import validate_task_names
from distill.export import gguf as gguf_export
from distill.export.formats import check_formats
from distill.models.teacher import Teacher
from distill.module import DistillModule
from distill.objective.objective import DistillationObjective
from distill.recipe.strategies import (
    apply_student_switches,
    check_sharded_callbacks,
    check_sharded_generation,
    check_trainer_config,
    is_fsdp,
    is_zero3,
)
from distill.runtime.gather import finish_gathered, gather_student, local_bytes
from distill.runtime.rank_zero_load import empty_weights, launch_rank, tie_again
from distill.runtime.resume import resolve_resume
from distill.runtime.tracking import LogConfig

log = logging.getLogger("distill")


@dataclass
class Plan:
    """What :func:`check_settings` found, for the later steps.

    Attributes:
        objective: the built loss.
        ckpt_path: the checkpoint to resume from; None for a fresh start.
        formats: the export formats, checked (empty with ``export.enabled=false``); :func:`check_gguf` may drop
            ``gguf`` from a default run whose student a GGUF file cannot hold.

    """

    objective: DistillationObjective
    ckpt_path: str | None
    formats: list[str]


def check_settings(cfg: DictConfig) -> Plan:
    """Settings that can be checked without models, so a typo fails before a slow teacher load."""
    check_trainer_config(cfg.trainer, objective=cfg.distill.objective)  # e.g. FSDP on CPU, before any load
    check_sharded_callbacks(cfg.trainer, cfg.get("callbacks"))
    check_sharded_generation(cfg.trainer, cfg.distill.get("generation"))
    if not isinstance(cfg.get("seed"), int):
        raise config_error("seed", cfg.get("seed"), "give an integer seed, e.g. seed=1234")
    check_optimization(cfg.distill.optimizer, cfg.distill.get("scheduler"))
    ckpt_path = resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir) / "checkpoints")
    objective = build(cfg.distill.objective)
    formats = check_formats(cfg.export, cfg.get("callbacks")) if cfg.export.enabled else []  # before the teacher
    if cfg.eval.enabled:
        validate_task_names(cfg.eval.tasks or [])
        check_sets(cfg.eval.get("heldout"), cfg.eval.get("max_batches"))
        if cfg.eval.llama_cpp_bin:  # llama.cpp's score of the GGUF file: its tool and the file, before training
            llama_cpp.tool(cfg.eval.llama_cpp_bin, "llama-perplexity", field="eval.llama_cpp_bin")
            if "gguf" not in formats or not cfg.export.verify:
                raise config_error(
                    "eval.llama_cpp_bin",
                    cfg.eval.llama_cpp_bin,
                    "llama.cpp scores the run's verified GGUF file: add gguf to export.formats (with export.verify), "
                    "or set eval.llama_cpp_bin=null",
                )
    if is_zero3(cfg.trainer.get("strategy")) and objective.chunked == "auto":
        # ZeRO-3 partitions the output layer's weight outside its forward, which the chunked path reads.
        log.info("distill.objective.chunked=auto: off under deepspeed ZeRO-3 (docs/scale_out.md)")
        objective.chunked = False
    return Plan(objective, ckpt_path, formats)


def check_gguf(cfg: DictConfig, objects: dict[str, Any], plan: Plan, origin: ConfigOrigin | None) -> None:
    """What the GGUF file cannot hold, known from the built student: refused now, not after training.

    When the GGUF export came with the default run rather than from the user, the run exports hf only instead.
    """
    try:
        gguf_export.check_student(objects["student"], objects["module"].tokenizer, cfg.export.gguf_type)
    except ConfigError as err:
        if origin is None or origin.typed("export.formats") or origin.experiment_typed:
            raise
        log.warning("%s (export.formats has gguf from the default run, not from you): exporting hf only", err)
        plan.formats.remove("gguf")
        with open_dict(cfg):  # the report's record of the config says what was exported
            cfg.export.formats = list(plan.formats)


def _reads_weights(cfg: DictConfig, measured: bool) -> bool:
    """Whether this process reads the teacher's weights: under FSDP only rank 0 does (rank_zero_load.py)."""
    extras = cfg.get("trainer_extras") or {}
    if not (is_fsdp(cfg.trainer.get("strategy")) and extras.get("teacher_on_rank_zero", True)):
        return True
    if measured:  # scoring layers runs the teacher on calibration text, on every rank
        log.info("every rank reads the teacher: student.select=%s scores its layers", cfg.student.select)
        return True
    if launch_rank() == 0:
        return True
    log.info("rank %d builds the teacher and student empty; rank 0 fills each FSDP unit", launch_rank())
    return False


def build_models(cfg: DictConfig, plan: Plan) -> dict[str, Any]:
    """Seed, then build teacher, student, data and the LightningModule, in this order (it fixes the init)."""
    pl.seed_everything(cfg.seed, workers=True)
    # A student that measures which teacher layers to keep (student.select) needs training text, so the data
    # comes first for it; every other student keeps the order below, and with it the RNG draws of its init.
    measured = cfg.student.get("select", "even") != "even"
    reads = _reads_weights(cfg, measured)
    with nullcontext() if reads else empty_weights():
        teacher = build(cfg.teacher)
        datamodule = build(cfg.data, tokenizer=teacher.tokenizer) if measured else None
        if datamodule is not None:
            datamodule.setup("fit")  # tokenises and caches the splits (prepare_data's work), then loads them
        calibration = {"calibration": datamodule.train_set} if datamodule is not None else {}  # training split only
        student = build(cfg.student, teacher=teacher, **calibration)
    if not reads:
        tie_again(getattr(teacher, "model", teacher), student)
    apply_student_switches(student, cfg.get("trainer_extras"))  # activation checkpointing, torch.compile
    objective = plan.objective
    objective.attach(student.config, teacher.config)
    tokenizer = _student_tokenizer(cfg, teacher, student, objective, plan.formats)
    if datamodule is None:
        datamodule = build(cfg.data, tokenizer=tokenizer)
        # Tokenise (or load the cached splits) now: a bad file or column fails here, before the loggers write.
        datamodule.setup("fit")
    teacher.check_data(datamodule)  # a cached teacher only fits the data it was built from
    module = DistillModule(
        teacher,
        student,
        objective,
        optimizer=build(cfg.distill.optimizer),
        scheduler=build(cfg.distill.scheduler) if cfg.distill.get("scheduler") else None,
        generation=_generation(cfg, teacher, datamodule),
        student_tokenizer=tokenizer,
    )
    if module.chunked:  # distill.objective.chunked: auto turns it on from chunked_min_vocab entries
        log.info("the loss takes the chunked path (%d-entry vocabulary; docs/performance.md)", module.vocab_size)
    return {"teacher": teacher, "student": student, "module": module, "datamodule": datamodule}


def _student_tokenizer(
    cfg: DictConfig, teacher: Teacher, student: Any, objective: DistillationObjective, formats: list[str]
) -> Any:
    """The student's tokenizer: the teacher's, or its own with ``distill.objective.cross_tokenizer``.

    Across tokenizers the data is tokenised with the student's, the export carries it, and the end-of-run report
    scores what is defined across vocabularies (bits per byte, agreement in bytes: ``assess_cross``).
    """
    own = getattr(student, "distill_tokenizer", None)
    method = objective.cross_tokenizer
    if method is None:
        return teacher.tokenizer
    if own is None:
        raise config_error(
            "distill.objective.cross_tokenizer",
            method,
            "the student uses the teacher's tokenizer; set it to null, or give the student its own "
            "(student=pretrained student.path=..., or student=tiny student.tokenizer=...)",
        )
    if teacher.cached:
        raise config_error("distill.objective.cross_tokenizer", method, "a cached teacher has no text to re-read")
    if "gguf" in formats and cfg.export.gguf_pre == "auto":
        raise config_error(
            "export.gguf_pre",
            "auto",
            "auto names the teacher's llama.cpp pre-tokenizer, not the student's; name the student's "
            "(export.gguf_pre=default for GPT-2's split)",
        )
    objective.attach_tokenizers(teacher.tokenizer, own)
    if objective.cross is not None and objective.cross.shared is not None:
        log.info("cross-tokenizer align: %d shared tokens", objective.cross.shared.size)
    return own


def _generation(cfg: DictConfig, teacher: Teacher, datamodule: Any) -> Generation | None:
    """``distill.generation`` built and checked against the data and the teacher (None when nothing is generated)."""
    node = cfg.distill.get("generation")
    generation = build(node, field="distill.generation") if node else None
    if generation is None or not generation.enabled:
        return None
    if teacher.cached:  # a cached teacher holds targets for corpus text only
        key = "student_fraction" if generation.student_fraction else "teacher_fraction"
        raise config_error(
            f"distill.generation.{key}",
            getattr(generation, key),
            "a cached teacher cannot score or write generated text; use a live teacher (teacher=smollm2 ...)",
        )
    if generation.teacher_fraction and cfg.distill.objective.get("cross_tokenizer"):
        raise config_error(
            "distill.generation.teacher_fraction",
            generation.teacher_fraction,
            "the teacher writes in its own tokens, which this run's data does not use; set it to 0 across tokenizers",
        )
    generation.check(datamodule.block_size, datamodule.tokenizer)
    log.info("generated rows: %s (docs/generation.md)", generation.settings())
    return generation


def build_trainer(cfg: DictConfig) -> tuple[pl.Trainer, list, dict[str, Any], list[CompressionStage]]:
    """The trainer with its loggers and callbacks; the compression stages last, in pipeline order."""
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = named_callbacks(cfg.get("callbacks"))
    stages = compression_stages(callbacks.values())
    check_schedule(stages)
    # Lightning calls callbacks in list order; compression stages run in pipeline order, so none waits on another.
    others = [cb for cb in callbacks.values() if cb not in stages]
    extra = [LogConfig(OmegaConf.to_container(cfg, resolve=True))] if loggers else []
    trainer: pl.Trainer = build(
        cfg.trainer, field="trainer", callbacks=[*others, *stages, *extra], logger=loggers or False
    )
    return trainer, loggers, callbacks, stages


def gather_whole(cfg: DictConfig, objects: dict[str, Any], trainer: pl.Trainer, stages: list[CompressionStage]) -> None:
    """Replace the sharded student (and teacher) in ``objects`` with whole ones on rank 0 (docs/scale_out.md)."""
    held = local_bytes(objects["teacher"])
    log.info("rank %d holds %d bytes of the teacher's parameters", trainer.global_rank, held)
    if not (cfg.export.enabled or cfg.eval.enabled):
        return
    module = objects["module"]  # its structure log rebuilds the trained student's modules (scale_out.md)
    config = type(objects["student"].config).from_dict(module.initial_student_config)
    student = gather_student(
        trainer.strategy.model, objects["student"], lambda dtype: rebuilt_student(config, module.structure, dtype)
    )
    if student is not None:
        finish_gathered(student, stages)  # QAT converts the whole student here, not its shards (scale_out.md)
        objects["student"] = student
        # The teacher's shards are frozen copies of its source, so rank 0 loads it again rather than gathering
        # it: the evaluation compares the student with the teacher as the user named it.
        objects["teacher"] = build(cfg.teacher) if cfg.eval.enabled else objects["teacher"]
