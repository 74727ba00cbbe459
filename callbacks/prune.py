"""Progressive structured pruning during distillation: attention heads, MLP channels, layers, hidden width.

``callbacks=prune`` (``conf/callbacks/prune.yaml``). Between ``start_step`` and ``end_step`` the
callback prunes every ``every_n_steps`` along a cubic (Zhu & Gupta, 2017) or linear schedule until the
targets are met; afterwards the structure is fixed and distillation heals it (Minitron, Sheared-LLaMA).

Units are removed physically at each pruning step (no masks): the linears are sliced, the config is
updated, the optimizer is rebuilt with its Adam moments sliced to the surviving rows and columns, and
under DDP the DDP wrapper is rebuilt around the new parameters. Under FSDP the student is gathered on rank 0,
cut there (and alike on the other ranks' empty copies) and wrapped again (:mod:`distill.runtime.rewrap`).
Every step is recorded with ``record_structure_change(self.stage, spec)`` (the kept indices), and
:mod:`distill.compress.replay` rebuilds the same shapes on a fresh student before a checkpoint's weights load.
Only the Lightning hooks live here; the maths (``schedule``, ``selection``, ``importance``, ``surgery``) is in
:mod:`distill.compress.prune`.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.base import CompressionCallback
from distill.compress.prune.importance import ImportanceAccumulator
from distill.compress.prune.schedule import PruneSchedule, check_calibration
from distill.compress.prune.selection import (
    add_compensation,
    compensation,
    require_llama_like,
    select,
    select_per_layer,
)
from distill.compress.prune.surgery import PRUNE, apply_spec, layer_shapes, shapes
from distill.compress.stages import compression_stages
from distill.recipe.strategies import check_prune_strategy
from distill.runtime.gather import params_whole
from distill.runtime.ranks import computed_on_rank_zero
from distill.runtime.rewrap import reshape

log = logging.getLogger("distill.prune")


class ProgressiveStructuredPruning(CompressionCallback):
    """Prune heads, MLP channels, decoder layers and the hidden width of the student while it distils.

    Targets are a fraction to remove (float in [0, 1)) or a count to keep per layer (int); ``null``
    leaves that dimension alone.

    Args:
        heads: query heads per layer. With ``head_grouping=within_group`` query heads are removed
            inside each KV group, so the kept count must be a multiple of the KV heads; with
            ``kv_groups`` whole KV groups go, so it must be a multiple of the group size.
        channels: MLP intermediate channels per layer.
        layers: decoder layers.
        importance: ``activation`` (Minitron), ``taylor`` (|w·∇w|, LLM-Pruner) or ``magnitude``.
            Layers always score by block influence (1 − cos between a layer's input and output).
        head_grouping: ``within_group`` or ``kv_groups`` (see ``heads``).
        calib_batches: training batches right before each pruning step over which scores accumulate.
        start_step: step where the schedule starts (sparsity 0).
        end_step: step of the last pruning step; the targets are met here and the structure stays fixed.
        every_n_steps: steps between pruning steps.
        schedule: ``cubic`` (prune fast early, gently near the end) or ``linear``.
        bias_compensation: FLAP's idea: add the mean contribution of removed channels and heads (mean input
            × their ``down_proj``/``o_proj`` columns, over the calibration batches) to a bias on the output
            projection, so pruning before healing hurts less. The export then has ``mlp_bias`` and
            ``attention_bias`` set (zero biases on the other projections) and is still a plain Llama.
        target: the one-number knob for sweeps (``callbacks.prune.target=0.25,0.5,0.75``): the fraction of
            MLP channels to remove, i.e. ``channels`` under another name; setting both differently is an error.
        uniform: True keeps one width for all layers (a plain Hugging Face Llama export). False ranks units
            across layers, so each layer keeps its own head and channel counts (their totals meet the
            targets); the export then records per-layer shapes and loads with ``load_pruned.py``.
        hidden: hidden (residual-stream) channels of the whole model, Minitron's embedding pruning.
        hidden_multiple: the pruned hidden size stays a multiple of this (32: the QAT group size) and of
            the config's head count; see :mod:`distill.compress.prune.schedule`.

    """

    stage = PRUNE.name

    def __init__(
        self,
        heads: float | int | None = None,
        channels: float | int | None = None,
        layers: float | int | None = None,
        importance: str = "activation",
        head_grouping: str = "within_group",
        calib_batches: int = 4,
        start_step: int = 0,
        end_step: int = 0,
        every_n_steps: int = 10,
        schedule: str = "cubic",
        bias_compensation: bool = False,
        target: float | None = None,
        uniform: bool = True,
        hidden: float | int | None = None,
        hidden_multiple: int = 32,
    ) -> None:
        super().__init__()
        self.plan = PruneSchedule.from_config(
            heads=heads,
            channels=channels,
            layers=layers,
            target=target,
            importance=importance,
            head_grouping=head_grouping,
            calib_batches=calib_batches,
            start_step=start_step,
            end_step=end_step,
            every_n_steps=every_n_steps,
            schedule=schedule,
            hidden=hidden,
            hidden_multiple=hidden_multiple,
            uniform=uniform,
        )
        self.start_step, self.end_step = start_step, end_step
        self.calib_batches = calib_batches
        self.bias_compensation = bias_compensation
        self.uniform = uniform
        self.scores = ImportanceAccumulator(importance, layers is not None, bias_compensation, hidden is not None)
        check_calibration(importance, self.scores.needs_data, end_step)
        self.events = self.plan.events()
        self.done: list[int] = []
        self.original: dict[str, int] | None = None
        self.final: dict[str, int] | None = None
        self._after: dict[str, int] = {}  # the shapes after the last cut, for its log

    def sizes_at(self, step: int) -> dict[str, int]:
        """Layers, query heads, KV heads and channels the student has after the pruning step at ``step``."""
        assert self.original is not None and self.final is not None
        return self.plan.sizes_at(step, self.original, self.final)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the targets against the student and the strategy; remember the original widths."""
        if stage != "fit":
            return
        student = pl_module.student
        require_llama_like(student)
        check_prune_strategy(trainer.strategy, self.end_step, trainer.max_steps)
        if self.original is None:
            self.original = shapes(student)
        self.final = self.plan.final_sizes(self.original)
        stages = compression_stages(trainer.callbacks)
        self.plan.check_stack(student, self.final, pl_module.objective.needs_hidden_states, stages)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the scoring hooks; here, after a resumed run has rebuilt the pruned structure."""
        self.scores.attach(pl_module.student)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the scoring hooks."""
        self.scores.detach()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Prune at scheduled steps; collect scores on the batches just before one."""
        step = trainer.global_step
        if step in self.events and step not in self.done:
            self._prune(trainer, pl_module, step)
        upcoming = [e for e in self.events if e > step and e not in self.done]
        self.scores.collecting = self.scores.needs_data and bool(upcoming) and upcoming[0] - step <= self.calib_batches

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Taylor scores read the gradients (under FSDP gathered whole); the step's statistics are summed over ranks.

        Summed at each calibration step, not at the cut: a checkpoint (written by rank 0 alone) then holds every
        rank's statistics, and a run resumed between two calibration steps cuts the units it would have cut.
        """
        if not self.scores.collecting:
            return
        if self.scores.method == "taylor":
            with params_whole(trainer.strategy.model, pl_module.student, with_grads=True):
                self.scores.accumulate_grads(pl_module.student)
        self._reduce_scores(trainer, pl_module)

    def _reduce_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self.scores.reduce(lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Stop collecting outside the training step (validation forwards must not count)."""
        self.scores.collecting = False

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        student = pl_module.student
        now, target = shapes(student), self.sizes_at(step)
        self.done.append(step)
        # Totals over layers: equal to layers × per-layer width for uniform models, the budget otherwise.
        wanted = {f"total_{k}": target[k] * target["layers"] for k in ("heads", "kv_heads", "channels")}
        wanted |= {"layers": target["layers"], "hidden": target["hidden"]}
        if all(now[k] == v for k, v in wanted.items()):
            return
        if self.scores.needs_data:
            # Every rank must remove the same units: statistics not yet summed over ranks are summed now.
            self._reduce_scores(trainer, pl_module)
        # FSDP holds flat shards: the student is gathered on rank 0, cut there and alike on the other ranks' empty
        # copies, and wrapped again. Every strategy keeps the optimizer state of the surviving rows and columns.
        reshape(trainer, pl_module, lambda: self._cut(pl_module, target))
        self.scores.reset()
        self.scores.attach(student)
        self._log_shapes(trainer, pl_module, step)

    def _cut(self, pl_module: pl.LightningModule, target: dict[str, int]) -> dict[torch.nn.Parameter, Any]:
        """Choose the units to remove (on rank 0, every rank takes its choice) and remove them; returns the carry."""
        student = pl_module.student
        spec, terms = computed_on_rank_zero(lambda: self._choose(student, target))
        carry = apply_spec(student, spec)
        add_compensation(student, terms)
        pl_module.record_structure_change(self.stage, spec)
        self._after = shapes(student)  # the whole student's, also when FSDP then shards it
        return carry

    def _choose(self, student: torch.nn.Module, target: dict[str, int]) -> tuple[dict[str, Any], list[Any]]:
        """The pruning spec and its bias-compensation terms, from the scores and (magnitude) the weights."""
        if self.uniform:
            spec = select(self.scores, student, target)
        else:
            spec = select_per_layer(self.scores, student, target, self.plan.head_grouping)
        terms = compensation(self.scores, student, spec) if self.bias_compensation else []
        if terms:
            spec["biases"] = sorted({kind for _, kind, _ in terms})
        return spec, [(j, kind, vec.cpu()) for j, kind, vec in terms]

    def _log_shapes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        after = self._after
        if trainer.is_global_zero:
            log.info("pruned at step %d: %s", step, after)
        logged = {f"prune/{k}": float(v) for k, v in after.items()}
        if not self.uniform:  # per-layer widths: chart each layer's shape too
            for i, layer in enumerate(layer_shapes(pl_module.student)):
                logged.update({f"prune/layer{i}/{k}": float(v) for k, v in layer.items()})
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """Schedule progress, the original widths and the partial scores."""
        return {"done": list(self.done), "original": self.original, "scores": self.scores.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the schedule where the checkpoint left it."""
        self.done = list(state_dict["done"])
        self.original = state_dict["original"]
        if self.original is not None:
            self.final = self.plan.final_sizes(self.original)
        self.scores.load_state_dict(state_dict["scores"])
