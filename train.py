"""Distil a teacher LLM into a student: ``python train.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.compress.quant.schemes import get_scheme
from distill.compress.replay import rebuilt_student
from distill.compress.stages import CompressionStage, check_schedule, compression_stages
from distill.config import (
    ConfigError,
    ConfigOrigin,
    build,
    check_optimization,
    config_error,
    exit_on_config_error,
    instantiate_loggers,
    named_callbacks,
)
from distill.data.generation import Generation
from distill.data.named_sets import check_sets
from distill.eval.assess import Comparison, Provenance, assess, assess_cross, build_heldout, heldout_pass
from distill.eval.cost import disk_bytes
from distill.eval.sweep import versus_ptq
from distill.eval.tasks import validate_task_names
from distill.export import gguf as gguf_export
from distill.export.formats import check_formats
from distill.export.hf import export_compact_forms, export_student, plain_model
from distill.export.torchao_hf import save_transformers_torchao
from distill.module import DistillModule
from distill.objective.objective import DistillationObjective
from distill.runtime.clock import TrainClock
from distill.runtime.gather import finish_gathered, gather_student, is_sharded, local_bytes
from distill.runtime.lock import run_lock
from distill.runtime.paths import export_root
from distill.runtime.rank_zero_load import empty_weights, launch_rank, tie_again
from distill.runtime.resume import resolve_resume
from distill.runtime.strategies import (
    apply_student_switches,
    check_sharded_callbacks,
    check_sharded_generation,
    check_trainer_config,
    is_fsdp,
    is_zero3,
)
from distill.runtime.tracking import LogConfig, publish_student

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
    objective, ckpt_path = _check_settings(cfg)
    objects = _build_models(cfg, objective)
    if cfg.export.enabled and "gguf" in check_formats(cfg.export):
        _check_gguf(cfg, objects, origin)
    trainer, loggers, callbacks, stages = _build_trainer(cfg)
    objects["trainer"] = trainer
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    clock = TrainClock.attach(trainer)  # training seconds across a resumed run's segments, kept in checkpoints
    trainer.fit(objects["module"], datamodule=objects["datamodule"], ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.fast_dev_run:
        return metrics, objects
    if is_sharded(trainer.strategy.model):
        _gather(cfg, objects, trainer, stages)  # every rank joins the gather; rank 0 goes on with the whole student
    held = _split_heldout(cfg, objects, trainer)  # under DDP every rank scores its share of the held-out batches
    if not trainer.is_global_zero:
        return metrics, objects
    if cfg.export.enabled:
        objects["export_dir"], objects["artifact_dir"] = _export(cfg, objects, stages, loggers)
    if cfg.eval.enabled:
        facts = {
            "recipe": cfg.get("recipe"),
            "train_seconds": clock.total,  # every segment of a resumed run
            "train_seconds_segment": clock.segment,  # this process's part
            "steps": trainer.global_step,
            "resumed_from": str(ckpt_path) if ckpt_path else None,
            "run_dir": str(cfg.paths.output_dir),
            "artifact": str(objects["artifact_dir"]) if objects.get("artifact_dir") else None,
        }
        facts |= _gguf_facts(objects.get("gguf"))
        report = _assess(cfg, objects, callbacks, facts, held)
        flat = {_side_key(k, side): v for side, values in report["metrics"].items() for k, v in values.items()}
        metrics.update(flat)
        _log_report(report, flat, loggers, trainer.global_step)
        objects["report"] = report
    return metrics, objects


def _check_gguf(cfg: DictConfig, objects: dict[str, Any], origin: ConfigOrigin | None) -> None:
    """What the GGUF file cannot hold, known from the built student: refused now, not after training.

    When the GGUF export came with the default run rather than from the user, the run exports hf only instead.
    """
    try:
        gguf_export.check_student(objects["student"], objects["module"].tokenizer, cfg.export.get("gguf_type", "auto"))
    except ConfigError as err:
        if origin is None or origin.typed("export.formats") or origin.experiment_typed:
            raise
        log.warning("%s (export.formats has gguf from the default run, not from you): exporting hf only", err)
        with open_dict(cfg):
            cfg.export.formats = [f for f in check_formats(cfg.export) if f != "gguf"]


def _gguf_facts(check: gguf_export.GGUFCheck | None) -> dict[str, Any]:
    """What the GGUF file's reload measured (docs/deploy.md), for the report's run facts; empty without one."""
    if check is None:
        return {}
    return {
        "gguf_file": str(check.file),
        "gguf_bytes": check.bytes,
        "gguf_max_abs_logit_vs_student": check.drift_max_abs_logit,
        "gguf_top1_vs_student_probe": check.drift_top1_agreement,
    }


def _gather(cfg: DictConfig, objects: dict[str, Any], trainer: pl.Trainer, stages: list[CompressionStage]) -> None:
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


def _check_settings(cfg: DictConfig) -> tuple[DistillationObjective, str | None]:
    """Settings that can be checked without models, so a typo fails before a slow teacher load.

    Returns:
        The objective, and the checkpoint to resume from (None for a fresh start).

    """
    check_trainer_config(cfg.trainer, objective=cfg.distill.objective)  # e.g. FSDP on CPU, before any load
    check_sharded_callbacks(cfg.trainer, cfg.get("callbacks"))
    check_sharded_generation(cfg.trainer, cfg.distill.get("generation"))
    if not isinstance(cfg.get("seed"), int):
        raise config_error("seed", cfg.get("seed"), "give an integer seed, e.g. seed=1234")
    check_optimization(cfg.distill.optimizer, cfg.distill.get("scheduler"))
    ckpt_path = resolve_resume(cfg.get("resume"), Path(cfg.paths.output_dir) / "checkpoints")
    objective = build(cfg.distill.objective)
    if cfg.export.enabled:
        check_formats(cfg.export, cfg.get("callbacks"))  # before the teacher loads
    if cfg.eval.enabled:
        validate_task_names(cfg.eval.tasks or [])
        check_sets(cfg.eval.get("heldout"), cfg.eval.get("max_batches"))
    if is_zero3(cfg.trainer.get("strategy")) and objective.chunked == "auto":
        # ZeRO-3 partitions the output layer's weight outside its forward, which the chunked path reads.
        log.info("distill.objective.chunked=auto: off under deepspeed ZeRO-3 (docs/scale_out.md)")
        objective.chunked = False
    return objective, ckpt_path


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


def _build_models(cfg: DictConfig, objective: DistillationObjective) -> dict[str, Any]:
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
    objective.attach(student.config, teacher.config)
    tokenizer = _student_tokenizer(cfg, teacher, student, objective)
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


def _student_tokenizer(cfg: DictConfig, teacher: Any, student: Any, objective: DistillationObjective) -> Any:
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
    if hasattr(teacher, "targets"):
        raise config_error("distill.objective.cross_tokenizer", method, "a cached teacher has no text to re-read")
    if cfg.export.enabled and "gguf" in check_formats(cfg.export) and cfg.export.get("gguf_pre", "auto") == "auto":
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


def _generation(cfg: DictConfig, teacher: Any, datamodule: Any) -> Generation | None:
    """``distill.generation`` built and checked against the data and the teacher (None when nothing is generated)."""
    node = cfg.distill.get("generation")
    generation = build(node, field="distill.generation") if node else None
    if generation is None or not generation.enabled:
        return None
    if hasattr(teacher, "targets"):  # a cached teacher holds targets for corpus text only
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


def _build_trainer(cfg: DictConfig) -> tuple[pl.Trainer, list, dict[str, Any], list[CompressionStage]]:
    """The trainer with its loggers and callbacks; the compression stages last, in STAGES order."""
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = named_callbacks(cfg.get("callbacks"))
    stages = compression_stages(callbacks.values())
    check_schedule(stages)
    # Lightning calls callbacks in list order; compression stages run in STAGES order, so none waits on another.
    others = [cb for cb in callbacks.values() if cb not in stages]
    extra = [LogConfig(OmegaConf.to_container(cfg, resolve=True))] if loggers else []
    trainer: pl.Trainer = build(
        cfg.trainer, field="trainer", callbacks=[*others, *stages, *extra], logger=loggers or False
    )
    return trainer, loggers, callbacks, stages


def _export(
    cfg: DictConfig, objects: dict[str, Any], stages: list[CompressionStage], loggers: list
) -> tuple[Path, Path]:
    """The plain export (shared/factorised/quantized weights made plain), then each stage's compact form.

    Returns the plain export and the deployable artifact: the smallest of the exports on disk (each one was
    reloaded and checked against the student when written), whose size the report gives.
    """
    teacher, student, module = objects["teacher"], objects["student"], objects["module"]
    formats = check_formats(cfg.export)
    plain = plain_model(student, stages)
    out = export_student(
        plain,
        module.tokenizer,  # the student's: the teacher's, or its own across tokenizers
        cfg.export.dir,
        verify=cfg.export.verify,
        metadata={
            "teacher": teacher.identity,
            "structure": module.structure,
            "global_step": objects["trainer"].global_step,
            # The splits it trained and was validated on: evaluate.py rebuilds exactly these (or refuses).
            "data": objects["datamodule"].split_facts() if hasattr(objects["datamodule"], "split_facts") else None,
        },
    )
    publish_student(loggers, out)  # W&B: the export as a model artifact
    log.info("exported the student to %s", out)
    compact = export_compact_forms(student, module.tokenizer, stages, cfg.paths.output_dir)
    for name, path in compact.items():
        log.info("%s wrote a compact export to %s", name, path)
    candidates = [out, *compact.values()]
    if "torchao" in formats:
        qat = next((s for s in stages if s.stage == "qat"), None)
        if qat is None or not qat.converted:
            raise RuntimeError(
                "export.formats has torchao but QAT never converted the student (start_step not reached)"
            )
        folder = save_transformers_torchao(
            student, module.tokenizer, Path(cfg.paths.output_dir) / "student_torchao", qat.spec
        )
        log.info("wrote the transformers torchao export %s (loads with plain from_pretrained)", folder)
        candidates.append(folder)  # checked to reload with identical logits
    if "gguf" in formats:
        check = _export_gguf(cfg, plain, module.tokenizer, stages)
        objects["gguf"] = check
        # The report measures the student in memory, so the GGUF file is the artifact only when it computes
        # the same model (a student trained on its llama.cpp grid), not when writing it rounded the weights.
        if check is not None and check.drift_max_abs_logit <= gguf_export.RELOAD_ATOL:
            candidates.append(check.file.parent)
    artifact = min(candidates, key=lambda folder: disk_bytes(folder) or 0)
    return out, artifact


def _export_gguf(
    cfg: DictConfig, plain: Any, tokenizer: Any, stages: list[CompressionStage]
) -> gguf_export.GGUFCheck | None:
    """Write the GGUF file (``export.formats`` has ``gguf``); returns what its verification measured."""
    qat = next((s for s in stages if getattr(s, "gguf_types", None)), None)
    trained = qat.gguf_types if qat is not None else {}
    gguf_type = cfg.export.get("gguf_type", "auto")
    if gguf_type == "auto":  # the scheme's type (a mix of types names its file after the scheme's)
        gguf_type = get_scheme(qat.spec.scheme).gguf if qat is not None else "f16"
    pre = cfg.export.get("gguf_pre", "auto")
    if pre == "auto":
        pre = gguf_export.teacher_pre(cfg.teacher)
    if not trained and any(getattr(s, "spec", None) and s.spec.scheme.startswith("gguf_") for s in stages):
        log.warning(
            "QAT never converted the student (start_step not reached): the GGUF file rounds it to %s", gguf_type
        )
    if not cfg.export.verify:
        file = gguf_export.write_gguf(plain, tokenizer, cfg.export.gguf_dir, gguf_type, trained, pre=pre)
        log.info("wrote the GGUF export %s (not verified: export.verify=false)", file)
        return None
    # Checked before the folder is published: a file that fails leaves the previous one in place.
    check = gguf_export.export_gguf(plain, tokenizer, cfg.export.gguf_dir, gguf_type, trained, pre=pre)
    file = check.file
    log.info(
        "wrote the GGUF export %s (%s, %.2f MiB): reloads as written; against the student max |Δlogit| %.3g, "
        "top-1 agreement %.3f on a random probe",
        file,
        gguf_type,
        check.bytes / 2**20,
        check.drift_max_abs_logit,
        check.drift_top1_agreement,
    )
    return check


def _assess(
    cfg: DictConfig, objects: dict[str, Any], callbacks: dict[str, Any], facts: dict[str, Any], held: Any = None
) -> dict[str, Any]:
    """Evaluate the trained student against the teacher and write the run's compression report."""
    about = Provenance(
        export_dir=objects.get("artifact_dir") or objects.get("export_dir"),
        modifications=modifications(cfg, objects["module"], objects["trainer"].global_step, callbacks),
        config=OmegaConf.to_container(cfg, resolve=True),
        names=(objects["teacher"].name, "student"),
        run=facts,
    )
    cross = objects["module"].objective.cross
    if cross is not None:  # bits per byte and byte-level agreement (distill/eval/cross_heldout.py)
        return assess_cross(_comparison(cfg, objects), cross, cfg.eval, cfg.paths.output_dir, about)
    report = assess(_comparison(cfg, objects), cfg.eval, cfg.paths.output_dir, about, heldout=held)
    # One line against the cheapest alternative: the teacher quantized post-training to this size.
    label = facts["recipe"] or "student"
    log.info(versus_ptq(Path(cfg.paths.output_dir) / "report.json", cfg.eval.get("baselines"), label))
    return report


def _comparison(cfg: DictConfig, objects: dict[str, Any]) -> Comparison:
    """The trained student and the teacher, on the student's device, with the held-out sets (``eval.heldout``)."""
    teacher, student, datamodule = objects["teacher"], objects["student"], objects["datamodule"]
    teacher.to(next(student.parameters()).device)
    # Long-tail buckets come from the training split's token counts; a datamodule without them skips the buckets.
    counts = datamodule.train_token_counts() if hasattr(datamodule, "train_token_counts") else None
    tokenizer = objects["module"].tokenizer  # the student's (the teacher's unless cross_tokenizer)
    settings = cfg.eval
    if hasattr(teacher, "holds") and len(settings.get("heldout") or {}) > 1:
        # A cached teacher holds its corpus's blocks only: the other held-out sets have no teacher to compare with.
        log.warning("teacher=cached: eval.heldout scores the run's test split only (the cache holds no other text)")
        settings = OmegaConf.merge(settings, {"heldout": None})
        settings.heldout = {next(iter(cfg.eval.heldout)): "split"}
    return Comparison(
        student,
        teacher,
        tokenizer,
        build_heldout(settings, datamodule, tokenizer, cfg.paths.cache_dir),
        objects["module"].vocab_size,
        token_counts=counts,
    )


def _split_heldout(cfg: DictConfig, objects: dict[str, Any], trainer: pl.Trainer) -> Any:
    """Under DDP, the held-out pass split across the ranks: rank 0 gets the one-process result, the others None.

    Every DDP rank holds the whole student and teacher, so each scores its share of the batches (``None`` for
    one process, or under FSDP, whose whole student exists on rank 0 only: rank 0 then scores them all).
    """
    if not cfg.eval.enabled or trainer.world_size < 2 or is_sharded(trainer.strategy.model):
        return None
    if objects["module"].objective.cross is not None:  # rank 0 scores it across tokenizers (assess_cross)
        return None
    models = _comparison(cfg, objects)
    device = next(models.student.parameters()).device
    log.info("rank %d scores its share of the held-out batches (%d ranks)", trainer.global_rank, trainer.world_size)
    return heldout_pass(models, cfg.eval, device, shard=(trainer.global_rank, trainer.world_size))


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
    selection = getattr(module.student, "layer_selection", None)
    if selection:  # a from_teacher student that measured which teacher layers to keep
        mods.append({"kind": "layer_selection", "config": selection})
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
    with exit_on_config_error(discard=cfg.paths.output_dir), run_lock(cfg.paths.output_dir):
        metrics, _ = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    export_root()
    main()
