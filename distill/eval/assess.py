"""Measure a compressed model against its baseline on the same data and write the compression report.

Used at the end of ``train.py`` and by ``evaluate.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distill.config import ConfigError
from distill.eval.cost import cost_metrics
from distill.eval.heldout import format_table, generation_fidelity, heldout_metrics
from distill.eval.report import build_report, plot_run, write_report
from distill.eval.tasks import LOCAL_TASKS, build_local_tasks, hf_lm, run_tasks, task_manager

log = logging.getLogger("distill")


def _texts(loader: DataLoader, tokenizer: Any, max_blocks: int = 400) -> list[str]:
    """Held-out text back from the packed validation blocks (decoding BPE reproduces the text)."""
    ids = []
    for batch in loader:
        ids += batch["input_ids"].tolist()
        if len(ids) >= max_blocks:
            break
    eos = tokenizer.eos_token_id
    stream = [t for block in ids for t in block]
    docs, cur = [], []
    for t in stream:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return [tokenizer.decode(d) for d in docs if d]


@dataclass
class Comparison:
    """The two models a report compares, and the held-out data they are compared on.

    Attributes:
        student: the compressed model (a transformers causal LM).
        baseline: the reference (usually the teacher): a FrozenTeacher, a cached teacher or a causal LM.
        tokenizer: the shared tokenizer.
        val_loader: held-out batches.
        vocab_size: the shared vocabulary.

    """

    student: nn.Module
    baseline: nn.Module
    tokenizer: Any
    val_loader: DataLoader
    vocab_size: int

    @property
    def base_lm(self) -> nn.Module:
        """The causal LM inside a FrozenTeacher (the baseline itself otherwise)."""
        return getattr(self.baseline, "model", self.baseline)

    @property
    def can_generate(self) -> bool:
        """Whether the baseline can generate: a cached teacher has no model to run."""
        return hasattr(self.base_lm, "generate")


@dataclass
class Provenance:
    """What the report records about the two models besides what it measures.

    Attributes:
        export_dir: the student's export folder, whose size on disk is reported.
        baseline_dir: the baseline's folder, likewise (None when it has none).
        modifications: what was applied to the student, in order.
        config: the resolved run config (hashed into the report).
        names: labels of the two models.
        run: facts about the training run (recipe, wall-clock seconds, steps), stored as ``report["run"]``.

    """

    export_dir: str | Path | None = None
    baseline_dir: str | Path | None = None
    modifications: list[dict[str, Any]] = field(default_factory=list)
    config: Mapping[str, Any] = field(default_factory=dict)
    names: tuple[str, str] = ("teacher", "student")
    run: Mapping[str, Any] = field(default_factory=dict)


def assess(
    models: Comparison, settings: Mapping[str, Any], run_dir: str | Path, about: Provenance | None = None
) -> dict[str, Any]:
    """Score the student and the baseline on held-out data, tasks, generation and cost; write the report.

    Args:
        models: the student, the baseline and the data they are compared on.
        settings: the ``eval`` config: ``max_batches``, ``tasks``, ``task_examples``, ``task_limit``,
            ``task_batch_size``, ``fidelity_prompts``, ``prompt_tokens``, ``new_tokens``, ``speed_runs``, ``guard``.
        run_dir: where the report and plots go.
        about: where the models come from (folders, modifications, config, names, run facts).

    Returns:
        The report dict (also written as report.json / report.md).

    """
    about = about or Provenance()
    device = next(models.student.parameters()).device
    sides: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    _score_heldout(models, settings, sides, device)
    notes = _score_tasks(models, settings, Path(run_dir), sides)
    prompts = _score_fidelity(models, settings, sides, device)
    _score_cost(models, settings, sides, prompts, about)
    return _write(sides, notes, settings, run_dir, about)


def _score_heldout(
    models: Comparison, settings: Mapping[str, Any], sides: dict[str, dict[str, float]], device: torch.device
) -> None:
    held = heldout_metrics(
        {"teacher": models.baseline, "student": models.student},
        models.baseline,
        models.val_loader,
        models.vocab_size,
        max_batches=settings.get("max_batches"),
        device=device,
    )
    print("\nHeld-out evaluation (validation split):\n" + format_table(held), flush=True)
    for side in sides:
        sides[side].update({f"heldout/{k}": v for k, v in held[side].items() if k != "tokens"})


def _score_tasks(
    models: Comparison, settings: Mapping[str, Any], run_dir: Path, sides: dict[str, dict[str, float]]
) -> list[str]:
    """lm-eval tasks for both sides; returns notes for the report (local tasks skipped for lack of text)."""
    notes: list[str] = []
    tasks = list(settings.get("tasks") or [])
    task_dir = run_dir / "tasks"
    if any(t in LOCAL_TASKS for t in tasks):
        try:
            build_local_tasks(
                _texts(models.val_loader, models.tokenizer), task_dir, n_examples=settings.get("task_examples", 50)
            )
        except ConfigError as err:
            # Too little held-out prose: the run's other results still stand, so say so and go on.
            notes.append(f"local tasks skipped: {err}")
            log.warning("local tasks skipped: %s", err)
            tasks = [t for t in tasks if t not in LOCAL_TASKS]
    if not tasks:
        return notes
    manager = task_manager(task_dir, tasks)
    sided = {"student": models.student, **({"teacher": models.base_lm} if models.can_generate else {})}
    for side, model in sided.items():
        scores = run_tasks(
            hf_lm(model, models.tokenizer, settings.get("task_batch_size", 8)),
            tasks,
            manager,
            limit=settings.get("task_limit"),
        )
        for task, metrics in scores.items():
            sides[side].update({f"task/{task}/{k}": v for k, v in metrics.items()})
    return notes


def _score_fidelity(
    models: Comparison, settings: Mapping[str, Any], sides: dict[str, dict[str, float]], device: torch.device
) -> Tensor:
    """Greedy-generation agreement with the baseline; returns the held-out prompts used."""
    first = next(iter(models.val_loader))["input_ids"]
    prompts = first[: settings.get("fidelity_prompts", 8), : settings.get("prompt_tokens", 32)].to(device)
    if models.can_generate and settings.get("new_tokens", 16) > 0:
        fid = generation_fidelity(models.student, models.base_lm, prompts, settings.get("new_tokens", 16))
        sides["student"].update({f"fidelity/{k}": v for k, v in fid.items()})
        sides["teacher"].update({"fidelity/exact_match": 1.0, "fidelity/token_agreement": 1.0})
    return prompts


def _score_cost(
    models: Comparison,
    settings: Mapping[str, Any],
    sides: dict[str, dict[str, float]],
    prompts: Tensor,
    about: Provenance,
) -> None:
    """Size and speed of each side, and the student's compression ratio against the baseline's memory."""
    speed_probe = prompts[:1] if settings.get("speed_runs", 3) > 0 else None
    for side, model, folder in (
        ("student", models.student, about.export_dir),
        ("teacher", models.base_lm, about.baseline_dir),
    ):
        if side == "teacher" and not models.can_generate:
            continue
        cost = cost_metrics(
            model,
            folder,
            speed_probe if models.can_generate or side == "student" else None,
            new_tokens=settings.get("new_tokens", 16) or 16,
            runs=settings.get("speed_runs", 3),
        )
        sides[side].update({f"cost/{k}": v for k, v in cost.items() if v is not None})
    if "cost/bytes_memory" in sides["teacher"]:
        sides["student"]["cost/compression_ratio"] = sides["teacher"]["cost/bytes_memory"] / max(
            sides["student"]["cost/bytes_memory"], 1
        )
        sides["teacher"]["cost/compression_ratio"] = 1.0


def _write(
    sides: dict[str, dict[str, float]],
    notes: list[str],
    settings: Mapping[str, Any],
    run_dir: str | Path,
    about: Provenance,
) -> dict[str, Any]:
    """Build the report with its guard flags, write it and its plots into ``run_dir``."""
    guard = dict(settings.get("guard") or {})
    report = build_report(
        sides["teacher"], sides["student"], about.modifications or [], about.config or {}, guard, about.names
    )
    report["notes"] = notes
    report["run"] = dict(about.run or {})
    write_report(report, run_dir)
    try:
        plot_run(run_dir, sides["teacher"], sides["student"])
    except Exception as err:  # a plot must never cost the user their report
        log.warning("could not draw the report plots: %s", err)
    for flag in report["degradation"]["flags"]:
        log.warning("degradation guard: %s", flag["message"])
    return report
