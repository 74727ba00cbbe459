"""The evaluation step of a run (``train.py``): score the student against the teacher and write the report.

Under DDP every rank scores its share of the held-out batches first (:func:`split_heldout`); rank 0 then writes
the report (``report.json``/``report.md``), logs its numbers to the loggers, and prints one line against the
post-training quantization of the same size.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill.compress.stages import CompressionStage
from distill.eval import llama_cpp
from distill.eval.assess import Comparison, Provenance, assess, assess_cross, build_heldout, heldout_pass
from distill.eval.report import write_report
from distill.eval.sweep import versus_ptq
from distill.export import gguf as gguf_export
from distill.module import DistillModule
from distill.runtime.gather import is_sharded

log = logging.getLogger("distill")


def assess_run(
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
    if cfg.eval.llama_cpp_bin and objects.get("gguf") is not None:
        report["llama_cpp"] = _llama_cpp_score(cfg, objects)
        write_report(report, cfg.paths.output_dir)
    # One line against the cheapest alternative: the teacher quantized post-training to this size.
    label = facts["recipe"] or "student"
    log.info(versus_ptq(Path(cfg.paths.output_dir) / "report.json", cfg.eval.get("baselines"), label))
    return report


def _llama_cpp_score(cfg: DictConfig, objects: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's KL-divergence score of the run's GGUF file on the test split (``eval.llama_cpp_bin``)."""
    teacher = objects["teacher"]
    exe = llama_cpp.tool(cfg.eval.llama_cpp_bin, "llama-perplexity", field="eval.llama_cpp_bin")
    text = objects["datamodule"].split_text("test")
    # The F32 base file is as large as the fp32 teacher: written next to the run, removed when scored.
    with tempfile.TemporaryDirectory(dir=cfg.paths.output_dir, prefix=".llama_cpp_") as work:
        result = llama_cpp.score(
            teacher.model,
            teacher.tokenizer,
            gguf_export.teacher_pre(cfg.teacher),
            {"student": objects["gguf"].file},
            {"test": text},
            Path(work),
            exe,
            ctx=cfg.eval.llama_cpp_ctx,
            threads=torch.get_num_threads(),
        )
    lc, th = (result["sets"]["test"]["rows"]["student"][k] for k in ("llama_cpp", "torch"))
    log.info(
        "llama.cpp on the test split: same-top %.3f ± %.3f, mean KLD %.4f (p99 %.3f); torch on the same windows: "
        "same-top %.3f, mean KLD %.4f",
        lc["same_top"],
        lc["same_top_err"],
        lc["mean_kld"],
        lc["p99_kld"],
        th["same_top"],
        th["mean_kld"],
    )
    return result


def _comparison(cfg: DictConfig, objects: dict[str, Any]) -> Comparison:
    """The trained student and the teacher, on the student's device, with the held-out sets (``eval.heldout``)."""
    teacher, student, datamodule = objects["teacher"], objects["student"], objects["datamodule"]
    teacher.to(next(student.parameters()).device)
    # Long-tail buckets come from the training split's token counts; a datamodule without them skips the buckets.
    counts = datamodule.train_token_counts() if hasattr(datamodule, "train_token_counts") else None
    tokenizer = objects["module"].tokenizer  # the student's (the teacher's unless cross_tokenizer)
    settings = cfg.eval
    if teacher.cached and len(settings.get("heldout") or {}) > 1:
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


def split_heldout(cfg: DictConfig, objects: dict[str, Any], trainer: pl.Trainer) -> Any:
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


def flat_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The report's metrics as ``group/<side>/name`` keys (teacher, student, delta), as the loggers get them."""
    return {_side_key(k, side): v for side, values in report["metrics"].items() for k, v in values.items()}


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
def log_report(report: dict[str, Any], flat: dict[str, float], loggers: list, step: int) -> None:
    """Send the report's numbers to every logger, and its comparison as a table where the logger has tables (W&B)."""
    for lg in loggers:
        lg.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=step)
        if hasattr(lg, "log_table"):  # W&B: the comparison as a table
            rows = [[r["metric"], r["teacher"], r["student"], r["delta"], r["rel_delta"]] for r in report["comparison"]]
            lg.log_table("report/comparison", columns=["metric", "teacher", "student", "delta", "rel_delta"], data=rows)
        lg.save()
