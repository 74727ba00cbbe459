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
from distill.cost import cost_metrics
from distill.eval.cross_heldout import cross_heldout
from distill.eval.heldout import (
    Heldout,
    format_table,
    generation_fidelity,
    heldout_analysis,
    summarize_documents,
)
from distill.eval.report import build_report, plot_run, write_report
from distill.eval.tasks import LOCAL_TASKS, TaskCache, build_local_tasks, hf_lm, run_tasks, task_manager
from distill.models.teacher_cache import CachedTeacher

log = logging.getLogger("distill")


def _texts(loader: Any, tokenizer: Any, max_tokens: int | None = 1_000_000) -> list[str]:
    """Held-out text back from the packed validation blocks (decoding BPE reproduces the text).

    The local tasks need most of the embedded corpus's held-out text (~60k tokens) to reach 500 examples
    each, so the cap sits far above that; it only keeps a large hub corpus's validation split from being
    decoded whole.
    """
    ids: list[list[int]] = []
    for batch in loader:
        ids += batch["input_ids"].tolist()
        if max_tokens is not None and len(ids) * len(ids[0]) >= max_tokens:  # blocks are all one size
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
class Scored:
    """One named held-out set as a report reads it.

    Attributes:
        name: ``test`` (the run's test split) or the set's name in ``eval.heldout``.
        loader: the batches scored: every block, or a seeded spread over the documents.
        stream: the same blocks in document order (the local tasks' text is decoded from it); None: ``loader``.
        about: what the set is (``source``, ``documents`` and, for the run's own split, the split's settings).

    """

    name: str
    loader: DataLoader
    stream: DataLoader | None = None
    about: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """The two models a report compares, and the held-out data they are compared on.

    Attributes:
        student: the compressed model (a transformers causal LM).
        baseline: the reference (usually the teacher): a FrozenTeacher, a cached teacher or a causal LM.
        tokenizer: the shared tokenizer.
        heldout: the held-out sets, the in-domain test split first (a single DataLoader counts as a set
            named ``test``). The first set gives the report's ``heldout/*`` metrics, long tail, documents and the
            local tasks' text; each other set its own ``heldout_<name>/*`` metrics.
        vocab_size: the shared vocabulary.
        token_counts: training count per token id (``DistillDataModule.train_token_counts``), for the
            long-tail buckets; None leaves them out.

    """

    student: nn.Module
    baseline: nn.Module
    tokenizer: Any
    heldout: DataLoader | list[Scored]
    vocab_size: int
    token_counts: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.heldout, list):
            self.heldout = [Scored("test", self.heldout)]

    @property
    def sets(self) -> list[Scored]:
        """The held-out sets, the primary one first."""
        return self.heldout  # type: ignore[return-value]

    @property
    def val_loader(self) -> DataLoader:
        """The primary set's batches (prompts for generation fidelity and the speed probe come from it)."""
        return self.sets[0].loader

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
    models: Comparison,
    settings: Mapping[str, Any],
    run_dir: str | Path,
    about: Provenance | None = None,
    heldout: dict[str, Heldout] | None = None,
) -> dict[str, Any]:
    """Score the student and the baseline on held-out data, tasks, generation and cost; write the report.

    Args:
        models: the student, the baseline and the data they are compared on.
        settings: the ``eval`` config: ``max_batches``, ``tasks``, ``task_examples``, ``task_limit``,
            ``task_batch_size``, ``fidelity_prompts``, ``prompt_tokens``, ``new_tokens``, ``speed_runs``, ``guard``.
        run_dir: where the report and plots go.
        about: where the models come from (folders, modifications, config, names, run facts).
        heldout: the held-out pass already done, per set (split across ranks: :func:`heldout_pass`); run here if
            None.

    Returns:
        The report dict (also written as report.json / report.md).

    """
    about = about or Provenance()
    device = next(models.student.parameters()).device
    sides: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    documents, rows, sets = _score_heldout(models, sides, heldout or heldout_pass(models, settings, device))
    notes = _score_tasks(models, settings, Path(run_dir), sides)
    if isinstance(models.baseline, CachedTeacher):  # its held-out numbers are of a top-k reconstruction
        notes.append(models.baseline.report_note)
    prompts = _score_fidelity(models, settings, sides, device)
    _score_cost(models, settings, sides, prompts, about)
    return _write(sides, notes, settings, run_dir, about, documents, rows, sets)


def assess_cross(
    models: Comparison, cross: Any, settings: Mapping[str, Any], run_dir: str | Path, about: Provenance | None = None
) -> dict[str, Any]:
    """:func:`assess` for a teacher and a student with different tokenizers (``distill.objective.cross_tokenizer``).

    The held-out scores are the ones defined across vocabularies (:mod:`distill.eval.cross_heldout`): bits per
    byte of both models and top-1 agreement in bytes. Tasks run for each model through its own tokenizer. The
    teacher's speed is not timed (the probe prompts are student tokens) and greedy-generation fidelity is left
    out (it compares token ids).
    """
    about = about or Provenance()
    device = next(models.student.parameters()).device
    sides = cross_heldout(models.student, models.base_lm, cross, models.val_loader, settings.get("max_batches"), device)
    notes = _score_tasks(models, settings, Path(run_dir), sides)
    notes.append(
        "teacher and student use different tokenizers: held-out scores are bits per byte and top-1 agreement in "
        "bytes at byte-aligned positions; no generation fidelity, no teacher speed (docs/generation.md)"
    )
    first = next(iter(models.val_loader))["input_ids"]
    prompts = first[:1, : settings.get("prompt_tokens", 32)].to(device)
    _score_cost(models, settings, sides, prompts, about, teacher_speed=False)
    return _write(sides, notes, settings, run_dir, about)


def heldout_pass(
    models: Comparison, settings: Mapping[str, Any], device: torch.device, shard: tuple[int, int] | None = None
) -> dict[str, Heldout] | None:
    """The held-out pass of a report: both models over every held-out set (the batches each loader gives).

    With ``shard=(rank, world_size)`` every rank of the process group must call it; the batches are split
    across the ranks and rank 0 gets the one-process result (the others None; :func:`heldout_analysis`).
    Only the primary set is bucketed by training-token frequency (the long tail of the training text).
    """
    out = {}
    for i, scored in enumerate(models.sets):
        out[scored.name] = heldout_analysis(
            {"teacher": models.baseline, "student": models.student},
            models.baseline,
            scored.loader,
            models.vocab_size,
            device=device,
            token_counts=models.token_counts if i == 0 else None,
            eos_token_id=getattr(models.tokenizer, "eos_token_id", None),
            shard=shard,
        )
    return None if any(h is None for h in out.values()) else out


def heldout_key(name: str, index: int) -> str:
    """The report's metric group of a held-out set: ``heldout`` for the primary one, ``heldout_<name>`` else."""
    return "heldout" if index == 0 else f"heldout_{name}"


def _score_heldout(
    models: Comparison, sides: dict[str, dict[str, float]], held: dict[str, Heldout]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Held-out perplexity, KL and agreement of every set, the long tail and per-document scores, into ``sides``.

    Returns:
        The primary set's per-document scores for ``report.json``'s ``documents`` (worst first in report.md);
        each set's per-document sums for its ``heldout_rows`` (what paired comparisons resample); and what each
        set is, with its document and token counts, for ``heldout_sets``.

    """
    rows, sets = {}, {}
    for i, scored in enumerate(models.sets):
        result = held[scored.name]
        group = heldout_key(scored.name, i)
        counts = result.metrics["teacher"]
        sets[scored.name] = {
            **scored.about,
            "metrics": group,
            "documents_scored": int(counts["documents"]),
            "tokens_scored": int(counts["tokens"]),
        }
        head = f"{scored.name}: {int(counts['documents'])} documents, {int(counts['tokens'])} tokens"
        print(f"\nHeld-out evaluation, {head}:\n" + format_table(result.metrics), flush=True)
        for side in sides:
            sides[side].update({f"{group}/{k}": v for k, v in result.metrics[side].items()})
        rows[scored.name] = result.rows
    primary = held[models.sets[0].name]
    for side in sides:
        for bucket, values in primary.tail.get(side, {}).items():
            sides[side].update({f"tail/{bucket}/{k}": v for k, v in values.items()})
    sides["student"].update({f"docs/{k}": v for k, v in summarize_documents(primary.documents).items()})
    documents = []
    for d in primary.documents:
        entry = {
            "index": d["index"],
            "tokens": d["tokens"],
            "student_top1_agreement": d["student"]["top1_agreement"],
            "student_accuracy": d["student"]["accuracy"],
            "teacher_accuracy": d["teacher"]["accuracy"],
        }
        if models.tokenizer is not None:
            # A preview to recognise the document by; whitespace folded so it fits a table cell.
            entry["text"] = " ".join(models.tokenizer.decode(d["head"]).split())[:60]
        documents.append(entry)
    return documents, rows, sets


def _score_tasks(
    models: Comparison, settings: Mapping[str, Any], run_dir: Path, sides: dict[str, dict[str, float]]
) -> list[str]:
    """lm-eval tasks for both sides; returns notes for the report (local tasks skipped for lack of text).

    Each metric comes with its bootstrap interval and example count (``task/<task>/<metric>_ci_low``,
    ``_ci_high``, ``task/<task>/n``). The baseline's local-task results are read from and kept in
    ``settings["cache_dir"]`` (null: off) when the baseline has an identity (:class:`TaskCache`).
    """
    notes: list[str] = []
    tasks = list(settings.get("tasks") or [])
    task_dir = run_dir / "tasks"
    if any(t in LOCAL_TASKS for t in tasks):
        try:
            primary = models.sets[0]
            build_local_tasks(
                _texts(primary.stream or primary.loader, models.tokenizer),
                task_dir,
                n_examples=settings.get("task_examples", 500),
            )
        except ConfigError as err:
            # Too little held-out prose: the run's other results still stand, so say so and go on.
            notes.append(f"local tasks skipped: {err}")
            log.warning("local tasks skipped: %s", err)
            tasks = [t for t in tasks if t not in LOCAL_TASKS]
    if not tasks:
        return notes
    manager = task_manager(task_dir, tasks)
    batch_size = settings.get("task_batch_size", 8)
    sided = {"student": models.student, **({"teacher": models.base_lm} if models.can_generate else {})}
    # Each side reads the tasks through its own tokenizer (they differ across tokenizers: docs/generation.md).
    tokenizers = {
        "student": models.tokenizer,
        "teacher": getattr(models.baseline, "tokenizer", None) or models.tokenizer,
    }
    for side, model in sided.items():
        # The frozen teacher scores the same on the same tasks in every run: its results are kept on disk.
        cache = (
            TaskCache.for_model(
                settings.get("cache_dir"), getattr(models.baseline, "identity", None), model, batch_size, task_dir
            )
            if side == "teacher"
            else None
        )
        scores = run_tasks(
            hf_lm(model, tokenizers[side], batch_size),
            tasks,
            manager,
            limit=settings.get("task_limit"),
            label=side,
            cache=cache,
        )
        for task, metrics in scores.items():
            sides[side].update({f"task/{task}/{k}": v for k, v in metrics.items()})
    return notes


def _score_fidelity(
    models: Comparison, settings: Mapping[str, Any], sides: dict[str, dict[str, float]], device: torch.device
) -> Tensor:
    """Greedy-generation agreement with the baseline on ``fidelity_prompts`` held-out prompts (0: skipped).

    Returns the held-out prompts, at least one (the speed probe times generation from the first).
    """
    count = settings.get("fidelity_prompts", 8)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(
            f"eval.fidelity_prompts={count!r}: give a number of held-out prompts, or 0 to skip generation fidelity"
        )
    first = next(iter(models.val_loader))["input_ids"]
    prompts = first[: max(count, 1), : settings.get("prompt_tokens", 32)].to(device)
    if count > 0 and models.can_generate and settings.get("new_tokens", 16) > 0:
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
    teacher_speed: bool = True,
) -> None:
    """Size and speed of each side, and the student's compression ratios.

    ``compression_ratio`` compares bytes in memory (what the guard watches). The size on disk of the
    deployable artifact is compared with two references: the teacher in fp32 (4 bytes per parameter, what
    a ``save_pretrained`` of the dequantized teacher holds) and the teacher as shipped (the file it was
    loaded from, e.g. a 4-bit GGUF), so a student bigger than the user's starting file shows as a ratio below 1.
    """
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
            speed_probe if side == "student" or (models.can_generate and teacher_speed) else None,
            new_tokens=settings.get("new_tokens", 16) or 16,
            runs=settings.get("speed_runs", 3),
        )
        sides[side].update({f"cost/{k}": v for k, v in cost.items() if v is not None})
    teacher, student = sides["teacher"], sides["student"]
    if "cost/bytes_memory" not in teacher:
        return
    student["cost/compression_ratio"] = teacher["cost/bytes_memory"] / max(student["cost/bytes_memory"], 1)
    teacher["cost/compression_ratio"] = 1.0
    teacher["cost/bytes_fp32"] = 4 * teacher["cost/params"]
    shipped = getattr(models.baseline, "shipped_bytes", None)
    if shipped:
        teacher["cost/bytes_shipped"] = float(shipped)
        teacher.setdefault("cost/bytes_disk", float(shipped))  # loaded from that file: it is the teacher on disk
    for side in (teacher, student):
        if "cost/bytes_disk" in side:
            side["cost/ratio_vs_fp32_teacher"] = teacher["cost/bytes_fp32"] / side["cost/bytes_disk"]
            if shipped:
                side["cost/ratio_vs_shipped_teacher"] = shipped / side["cost/bytes_disk"]


def _write(
    sides: dict[str, dict[str, float]],
    notes: list[str],
    settings: Mapping[str, Any],
    run_dir: str | Path,
    about: Provenance,
    documents: list[dict[str, Any]] | None = None,
    rows: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the report with its guard flags, write it and its plots into ``run_dir``."""
    guard = dict(settings.get("guard") or {})
    report = build_report(
        sides["teacher"], sides["student"], about.modifications or [], about.config or {}, guard, about.names
    )
    report["notes"] = notes
    report["run"] = dict(about.run or {})
    report["heldout_sets"] = sets or {}
    report["documents"] = documents or []
    report["heldout_rows"] = rows or {}
    write_report(report, run_dir)
    try:
        plot_run(run_dir, sides["teacher"], sides["student"])
    except Exception as err:  # a plot must never cost the user their report
        log.warning("could not draw the report plots: %s", err)
    for flag in report["degradation"]["flags"]:
        log.warning("degradation guard: %s", flag["message"])
    return report


def build_heldout(settings: Mapping[str, Any], datamodule: Any, tokenizer: Any, cache_dir: str | Path) -> list[Scored]:
    """The report's held-out sets (``eval.heldout``), the run's test split first.

    ``eval.max_batches`` caps every set to a seeded spread of that many batches over its documents; None (the
    default) scores every block. The run's own split is read from ``datamodule``; the other sets are
    tokenised with ``tokenizer`` and cached under ``cache_dir`` (:mod:`distill.data.named_sets`).
    """
    from distill.data.named_sets import SPLIT, check_sets, load_set

    check_sets(settings.get("heldout"), settings.get("max_batches"))
    wanted = dict(settings.get("heldout") or {SPLIT: SPLIT})
    cap = settings.get("max_batches")
    sets = []
    for name, value in wanted.items():
        if value == SPLIT:
            facts = datamodule.split_facts() if hasattr(datamodule, "split_facts") else {}
            documents = len(getattr(datamodule, "heldout_docs", {}).get("test", [])) or None
            about = {"source": "this run's test split", "documents": documents, "split": facts}
            loader = datamodule.heldout_dataloader("test", max_batches=cap)
            sets.append(Scored(str(name), loader, datamodule.stream_dataloader("test"), about))
            continue
        held = load_set(str(name), value, tokenizer, datamodule.block_size, Path(cache_dir) / "heldout_sets")
        about = {"source": held.source, "documents": held.documents}
        batch = datamodule.eval_batch_size
        loader = held.loader(batch, datamodule.collate, max_batches=cap, seed=datamodule.seed)
        sets.append(Scored(str(name), loader, held.stream(batch, datamodule.collate), about))
    return sets
