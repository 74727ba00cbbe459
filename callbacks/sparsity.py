"""Weight sparsity during distillation: unstructured or 2:4, by magnitude or Wanda, on a cubic schedule.

``callbacks=sparsity`` (``conf/callbacks/sparsity.yaml``). Between ``start_step`` and ``end_step`` the callback
zeroes more of each decoder linear's weights every ``every_n_steps`` until ``target`` (or the 2:4 pattern) is
met; distillation heals the rest of the run. After every optimizer step the masks are applied again, so a
pruned weight cannot grow back (Adam's moments would otherwise move it). The masks live in this callback's
checkpoint state, so a resumed run continues with the same masks. The maths is in
:mod:`distill.compress.sparsity`.

Shapes never change, so the plain export is a dense Hugging Face model with the zeros in place, loadable
anywhere. On CUDA the compact export also writes the 2:4 form through torchao's ``sparsify_``.
Dense kernels (every CPU run) gain no speed from zeros.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from callbacks.base import CompressionCallback
from distill.compress.sparsity import (
    IMPORTANCES,
    PATTERNS,
    SPARSITY,
    InputNorms,
    layer_stats,
    level_at,
    overall,
    scores,
    semi_structured_mask,
    target_linears,
    unstructured_mask,
)
from distill.compress.stages import compression_stages, registry
from distill.config import config_error

log = logging.getLogger("distill.sparsity")


class WeightSparsity(CompressionCallback):
    """Zero a growing share of the student's decoder-layer weights while it distils.

    Args:
        target: final share of zero weights per linear, in (0, 1) (unstructured); ignored by ``pattern``.
        pattern: ``2:4`` (2 of every 4 consecutive input weights zero: what sparse tensor cores run), or null.
        importance: ``magnitude`` (|w|) or ``wanda`` (|w|·‖x‖ over the ``calib_batches`` before each step).
        compare: unstructured only: drop the lowest scores of each output ``row`` (Wanda) or of the ``layer``.
        start_step: first pruning step; end_step: the last, where the target is met.
        every_n_steps: steps between pruning steps.
        schedule: ``cubic`` (Zhu & Gupta 2017) or ``linear``.
        calib_batches: Wanda: training batches right before each pruning step whose activations are scored.

    """

    stage = SPARSITY.name

    def __init__(
        self,
        target: float | None = 0.5,
        pattern: str | None = None,
        importance: str = "wanda",
        compare: str = "row",
        start_step: int = 0,
        end_step: int = 0,
        every_n_steps: int = 10,
        schedule: str = "cubic",
        calib_batches: int = 2,
    ) -> None:
        super().__init__()
        field = "callbacks.sparsity"
        if pattern not in PATTERNS:
            raise config_error(f"{field}.pattern", pattern, "choose 2:4 or null (unstructured, with target)")
        if pattern is None and not (isinstance(target, (int, float)) and 0 < target < 1):
            raise config_error(f"{field}.target", target, "give the share of zero weights, between 0 and 1")
        if importance not in IMPORTANCES:
            raise config_error(f"{field}.importance", importance, f"choose one of {list(IMPORTANCES)}")
        if compare not in ("row", "layer"):
            raise config_error(f"{field}.compare", compare, "choose row (per output row, Wanda's) or layer")
        if schedule not in ("cubic", "linear"):
            raise config_error(f"{field}.schedule", schedule, "choose cubic or linear")
        if not (0 <= start_step <= end_step):
            raise config_error(f"{field}.end_step", end_step, f"must be at least start_step ({start_step})")
        if every_n_steps < 1:
            raise config_error(f"{field}.every_n_steps", every_n_steps, "must be at least 1")
        if importance == "wanda" and calib_batches < 1:
            raise config_error(f"{field}.calib_batches", calib_batches, "Wanda needs at least 1 calibration batch")
        if importance == "wanda" and start_step < calib_batches:
            raise config_error(
                f"{field}.start_step",
                start_step,
                f"Wanda scores the {calib_batches} training batches before each pruning step; start at step "
                f"{calib_batches} or later, or lower calib_batches",
            )
        self.pattern, self.importance, self.compare, self.schedule = pattern, importance, compare, schedule
        self.final = 0.5 if pattern == "2:4" else float(target)
        self.start_step, self.end_step, self.calib_batches = start_step, end_step, calib_batches
        self.events = sorted({*range(start_step, end_step + 1, every_n_steps), end_step})
        self.done: list[int] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.norms: InputNorms | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the student fits the pattern (a 2:4 pattern needs input widths divisible by 4)."""
        if stage != "fit":
            return
        linears = target_linears(pl_module.student)
        if not linears:
            raise config_error("callbacks.sparsity", "set", "the student has no decoder-layer linears to sparsify")
        stages = registry()
        shared = [cb.stage for cb in compression_stages(trainer.callbacks) if stages[cb.stage].rebuilds_linears]
        if shared:
            raise config_error(
                f"callbacks.{shared[0]}",
                "set",
                f"not supported together with callbacks.sparsity: {shared[0]} rebuilds the linears the masks are "
                "kept for (a tied weight would carry one mask per layer); use one of the two",
            )
        if self.pattern == "2:4":
            odd = [n for n, m in linears.items() if m.in_features % 4]
            if odd:
                raise config_error(
                    "callbacks.sparsity.pattern", "2:4", f"{odd[0]} has an input width not divisible by 4"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach Wanda's input-norm hooks (after a resumed run has rebuilt its structure) and apply any masks."""
        if self.importance == "wanda":
            saved = self.norms.sums if self.norms is not None else {}
            self.norms = InputNorms(target_linears(pl_module.student))
            self.norms.sums.update(saved)
        self._apply(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        if self.norms is not None:
            self.norms.remove()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Prune at scheduled steps; collect Wanda's activations on the batches just before one."""
        step = trainer.global_step
        if step in self.events and step not in self.done:
            self._prune(trainer, pl_module, step)
        if self.norms is not None:
            upcoming = [e for e in self.events if e > step and e not in self.done]
            self.norms.collecting = bool(upcoming) and upcoming[0] - step <= self.calib_batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Zero the pruned weights again after the optimizer moved them; stop collecting before validation."""
        if self.norms is not None:
            self.norms.collecting = False
        self._apply(pl_module)

    # -- pruning --------------------------------------------------------------------------------
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        level = level_at(step, self.start_step, self.end_step, self.final, self.schedule)
        self.done.append(step)
        linears = target_linears(pl_module.student)
        if self.norms is not None:  # every rank must cut the same weights: sum the statistics over ranks
            device = pl_module.device
            for name, total in self.norms.sums.items():
                self.norms.sums[name] = trainer.strategy.reduce(total.to(device), reduce_op="sum").cpu()
        for name, linear in linears.items():
            norms = self.norms.norms(name) if self.norms is not None else None
            score = scores(linear.weight, self.importance, norms)
            if self.pattern == "2:4":
                keep = semi_structured_mask(score, level)
            else:
                keep = unstructured_mask(score, level, self.compare)
            if name in self.masks:  # masks only grow (a pruned weight scores 0, but ties must not revive it)
                keep &= self.masks[name].to(keep.device)
            self.masks[name] = keep.to(linear.weight.device)  # kept where the weight is: applied every step
        if self.norms is not None:
            self.norms.reset()
        self._apply(pl_module)
        stats = layer_stats((n, m.weight.detach()) for n, m in linears.items())
        spec: dict[str, Any] = {"step": step, "level": round(level, 6), "zeros": round(overall(stats), 6)}
        if step == self.end_step:  # the final masks: the report lists each linear
            spec |= {"pattern": self.pattern or "unstructured", "importance": self.importance, "layers": stats}
        pl_module.record_structure_change(self.stage, spec)
        if trainer.is_global_zero:
            log.info("sparsity at step %d: %.3f of the decoder linears' weights are zero", step, overall(stats))
        pl_module.log("sparsity/overall", overall(stats), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _apply(self, pl_module: pl.LightningModule) -> None:
        if not self.masks:
            return
        linears = target_linears(pl_module.student)
        for name, keep in self.masks.items():
            weight = linears[name].weight
            if keep.device != weight.device:  # a checkpoint's masks arrive on the CPU: moved once, not every step
                keep = self.masks[name] = keep.to(weight.device)
            weight.mul_(keep)

    # -- export and state ------------------------------------------------------------------------
    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """On CUDA with the 2:4 pattern: the student with torchao's semi-structured weights, saved as a torch file."""
        if self.pattern != "2:4" or not torch.cuda.is_available():
            return None  # the plain export is the dense model with its zeros; CPU kernels are dense either way
        from torchao.sparsity import SemiSparseWeightConfig, sparsify_

        sparse = copy.deepcopy(model).to("cuda", torch.float16)
        names = set(target_linears(sparse))
        sparsify_(sparse, SemiSparseWeightConfig(), filter_fn=lambda _module, fqn: fqn in names)
        out = Path(run_dir) / "student_2to4"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(sparse.state_dict(), out / "model_2to4.pt")
        sparse.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Schedule progress, the masks (bit-packed) and Wanda's partial statistics."""
        # uint8 tensors and int lists: a checkpoint must load with torch.load(weights_only=True).
        packed = {
            n: (torch.from_numpy(np.packbits(m.cpu().numpy().ravel())), list(m.shape)) for n, m in self.masks.items()
        }
        norms = dict(self.norms.sums) if self.norms is not None else {}
        return {"done": list(self.done), "masks": packed, "norms": norms}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue with the checkpoint's masks and schedule."""
        self.done = list(state_dict["done"])
        self.masks = {
            n: torch.from_numpy(np.unpackbits(bits.numpy())[: int(np.prod(shape))].astype(bool)).reshape(shape)
            for n, (bits, shape) in state_dict["masks"].items()
        }
        if state_dict.get("norms"):
            self.norms = InputNorms({})
            self.norms.sums.update(state_dict["norms"])
