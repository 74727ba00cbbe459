"""The compression stages: one :class:`Stage` record per method, registered where the method is defined.

Compression callbacks change the student's shape mid-run (pruning removes rows, sharing ties layers,
low-rank splits linears, QAT swaps modules). A checkpoint's ``state_dict`` only fits a model that went
through the same changes, and Lightning loads the model weights *before* any callback state. So every
change is recorded as ``(kind, spec)`` in ``DistillModule.structure``; the checkpoint carries that log,
and on load :class:`~distill.module.DistillModule` replays it on the fresh student before the weights go in.

What the framework knows about a method is its :class:`Stage`: its place in the order, how to replay a recorded
change (so a checkpoint can be rebuilt by anything that imports ``distill``, ``evaluate.py`` too, without the
callbacks), the sharding strategies that refuse it and why, whether it must happen before the strategy wraps the
student, and its line in the report. Each method registers its own record next to its algorithm
(``register(Stage(...))`` at the end of its module); a new method is one more registered record, in any module
imported before the run starts (a test module will do). The Lightning callbacks implement
:class:`CompressionStage`; the export, the schedule check, the modification log and ``evaluate.py`` talk to
callbacks only through it.

The shipped stages run in the order prune → share → lowrank → sparsity → qat (:func:`stage_names`).
Quantization goes last because every other stage rewrites the weights it would have to quantize again; pruning
goes first because sharing and factorising a matrix that is then sliced wastes the work; weight sparsity
zeroes weights of the final shapes, and quantization keeps its zeros (zero is exact on every grid here). A change of an
earlier stage after a later one is refused, and :func:`check_schedule` refuses configs whose step
windows overlap in the wrong order before training starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import ConfigError

Replay = Callable[[nn.Module, dict[str, Any]], None]


@dataclass(frozen=True)
class Stage:
    """Everything the framework knows about one compression method.

    Attributes:
        name: the stage's name: its callbacks' ``stage``, the ``callbacks.<name>`` config key, and the ``kind``
            of the structure changes it records.
        order: its place in the pipeline (lower runs first); two stages may not share one.
        replay: re-applies one recorded change (its spec) to a fresh student, so a checkpoint's weights fit.
        refused_under: strategy families (``fsdp``, ``zero3``, ``deepspeed`` for stages 1–2) that cannot run it,
            each with the reason the error gives.
        before_wrapping: it replaces modules or Parameters, so under a sharding strategy it runs only from step 0,
            before the strategy wraps the student.
        rebuilds_linears: it replaces the student's linears with modules of its own (tied, factorised), which no
            transformers architecture holds and which other stages' per-linear state would not follow.
        needs_uniform_layers: every decoder layer must keep one shape (tying layers needs it).
        check_formats: refuses, from the stage's ``callbacks.<name>`` settings and the export formats, a student a
            format cannot hold (raises ConfigError) before anything trains; None: every format takes it.
        torchao_scheme: from the stage's settings, whether it trains a torchao quantization the torchao export
            writes (QAT on torchao's grids); None: it never does.
        summarize: the report's line for one recorded change, from its spec and a dict the stage's summaries of
            one run share (pruning carries its per-layer counts from step to step); None: the report lists the
            spec's settings.

    """

    name: str
    order: int
    replay: Replay
    refused_under: Mapping[str, str] = field(default_factory=dict)
    before_wrapping: bool = False
    rebuilds_linears: bool = False
    needs_uniform_layers: bool = False
    check_formats: Callable[[Mapping[str, Any], list[str]], None] | None = None
    torchao_scheme: Callable[[Mapping[str, Any]], bool] | None = None
    summarize: Callable[[Mapping[str, Any], dict], str] | None = None


# The modules whose import registers the shipped stages; a stage defined elsewhere registers when its module loads.
SHIPPED = (
    "distill.compress.prune.surgery",
    "distill.compress.share",
    "distill.compress.lowrank",
    "distill.compress.sparsity",
    "distill.compress.quant.qat",
)
_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (again under the same name replaces it); returns it."""
    clash = next((s for s in _REGISTRY.values() if s.order == stage.order and s.name != stage.name), None)
    if clash is not None:
        raise ValueError(f"stage {stage.name!r} takes order {stage.order}, which {clash.name!r} has")
    _REGISTRY[stage.name] = stage
    return stage


def registry() -> dict[str, Stage]:
    """Every registered stage by name, the shipped ones included (their modules are imported on first use)."""
    for module in SHIPPED:
        importlib.import_module(module)  # each registers its stage at import; a no-op once imported
    return _REGISTRY


def stage_names() -> tuple[str, ...]:
    """The registered stages' names in pipeline order."""
    return tuple(s.name for s in sorted(registry().values(), key=lambda s: s.order))


def stage_order(name: str) -> int:
    """A registered stage's place in the pipeline."""
    return registry()[name].order


@runtime_checkable
class CompressionStage(Protocol):
    """What every compression callback offers to the rest of the framework.

    ``stage`` names a registered :class:`Stage`; ``start_step`` is the first optimizer step at which the stage
    changes the student and ``end_step`` the step by which its structure is final (equal for one-shot
    stages). The structure spec a stage records with ``DistillModule.record_structure_change(stage, spec)``
    is replayed on resume by :func:`distill.compress.replay.replay`.
    """

    stage: str
    start_step: int
    end_step: int

    def is_applied(self, structure: list[dict[str, Any]]) -> bool:
        """Whether the structure log (``DistillModule.structure``) already holds this stage's change."""
        ...

    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """An equivalent model in the plain Hugging Face form of its config (``model`` itself if it is one)."""
        ...

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write this stage's compact form under ``run_dir`` and return its folder, or None when it has none."""
        ...

    def artifacts(self) -> list[Any]:
        """Typed objects the exporters read (QAT: a ``QuantizedStudent``); none for most stages."""
        ...


def compression_stages(callbacks: Iterable[Any]) -> list[CompressionStage]:
    """The compression stages among ``callbacks``, in pipeline order."""
    staged = [cb for cb in callbacks if isinstance(cb, CompressionStage)]
    names = stage_names()
    for cb in staged:
        if cb.stage not in names:
            raise ConfigError(
                f"{type(cb).__name__}.stage={cb.stage!r}: a compression stage must be a registered one {names} "
                "(register(Stage(...)) in the module that defines it)"
            )
    return sorted(staged, key=lambda cb: stage_order(cb.stage))


def check_stage_order(applied: list[str], kind: str) -> None:
    """Refuse a structure change of ``kind`` after a change of a later stage (see :func:`stage_names`)."""
    stages = registry()
    if kind not in stages:
        return
    later = [k for k in applied if k in stages and stages[k].order > stages[kind].order]
    if later:
        raise ConfigError(
            f"callbacks.{kind}: a {kind!r} change came after {later[-1]!r} was applied; compression runs in the "
            f"order {' → '.join(stage_names())}, so schedule {kind!r} to finish before {later[-1]!r} starts"
        )


def check_schedule(callbacks: Iterable[Any]) -> None:
    """Check, before training, that compression callbacks are scheduled in pipeline order.

    A later stage must not start before
    an earlier stage has finished; two callbacks of one stage are refused.
    """
    ordered = compression_stages(callbacks)
    seen: set[str] = set()
    for cb in ordered:
        if cb.stage in seen:
            raise ConfigError(f"callbacks: two {cb.stage!r} callbacks are configured; keep one")
        seen.add(cb.stage)
    order = " → ".join(stage_names())
    for i, later in enumerate(ordered):
        for earlier in ordered[:i]:
            if later.start_step < earlier.end_step:
                raise ConfigError(
                    f"callbacks.{later.stage}.start_step={later.start_step}: {later.stage} must start at or after "
                    f"the step where {earlier.stage} finishes (its end_step={earlier.end_step}), because compression "
                    f"runs in the order {order}; raise start_step or lower {earlier.stage}'s end_step"
                )
