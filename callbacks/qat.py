"""Quantization-aware training (torchao) as a Lightning callback; the maths is :mod:`distill.compress.quant.qat`.

The student is fake-quantized from ``start_step`` while it distils and converted to real quantized weights at fit
end. QAT is the last stage (:func:`distill.compress.stages.stage_names`): every other one rewrites the weights it would
have to quantize again, and ``check_schedule`` refuses a ``start_step`` before an earlier stage's ``end_step``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from callbacks.base import OneShotCompression
from distill.compress.quant import schemes
from distill.compress.quant.budget import check_budget, shared_spec_on_budget
from distill.compress.quant.qat import (
    FIELD,
    QAT,
    QuantizedStudent,
    check_init,
    check_steps,
    convert,
    converted_summary,
    current_ranges,
    fake_quantized,
    freeze_ranges,
    learned_blocks,
    prepare,
    prepared_summary,
    start_from_imatrix,
    with_learned_scales,
)
from distill.compress.quant.type_map import TypeMap, calibrated_importance
from distill.compress.stages import compression_stages
from distill.config import config_error
from distill.export import quantized
from distill.runtime.gather import is_sharded, params_whole

log = logging.getLogger("distill")


class QuantizationAwareTraining(OneShotCompression):
    """Fake-quantize the student's linears during distillation (torchao QAT), convert them at fit end.

    Args:
        scheme: a name in :data:`distill.compress.quant.schemes.SCHEMES`: torchao's (``int4_weight_only`` ...) or
            llama.cpp's block grids (``gguf_q4_0`` ...), whose trained weights the GGUF export writes as they are.
        group_size: for grouped schemes (default 32); must divide every quantized linear's in-features.
        skip: glob patterns (``fnmatch``) on the student's dotted module names that stay in full precision;
            null means :data:`distill.compress.quant.schemes.DEFAULT_SKIP` (embeddings, ``lm_head``, norms).
        modules: ``[linear]`` (default) or ``[linear, embedding]`` (weight-only schemes; a ``skip`` without
            ``*embed*``); a tied head shares the embedding's Parameter and codes, and stays tied in the export.
        gguf_types: ``gguf_*`` schemes: ``{module glob: llama.cpp type}``, the last match winning; null: one type.
        module_schemes: torchao schemes: ``{module glob: scheme or {scheme, group_size}}``, the last match winning.
        target_ratio: for ``gguf_*`` schemes instead of ``gguf_types``: a type per module so the GGUF file is at
            most 1/``target_ratio`` of the student's fp32 bytes (:mod:`distill.compress.quant.type_map`).
        target_bytes: instead of ``target_ratio``: the file's budget in bytes (``type_map.ByteTarget``). On a torchao
            scheme either one chooses a grid per module among ``budget_grids`` (``quant.grid_budget``).
        budget_probe: scale each module's error by the KL its rounding alone causes (``quant.probe``); null: on for
            torchao's grids, off for llama.cpp's types.
        init: ``rtn`` (weights as they are) or, on a llama.cpp grid, ``imatrix`` (``qat.start_from_imatrix``).
        learn_scales: train the 32-block types' scales with the weights (:mod:`~distill.compress.quant.learned_scales`).
        scale_gain: with ``learn_scales``, the scales' learning rate relative to the weights'.
        calibration_batches: with a byte budget: batches of 4 training rows that weigh the rounding errors.
        start_step: the global step fake-quant goes in (0: in ``setup``, before wrapping, as FSDP needs).
        freeze_ranges_step: from this step weight scales/zero points stay fixed; null: they follow the weights.
        export_dir: folder name under the run directory for the compact quantized export.

    """

    stage = QAT.name

    def __init__(
        self,
        scheme: str = "int8_dynact_int4_weight",
        group_size: int | None = None,
        skip: list[str] | None = None,
        modules: list[str] | None = None,
        gguf_types: dict[str, str] | None = None,
        module_schemes: dict[str, Any] | None = None,
        target_ratio: float | None = None,
        target_bytes: int | None = None,
        budget_grids: list[Any] | None = None,
        budget_probe: bool | None = None,
        calibration_batches: int = 8,
        init: str = "rtn",
        learn_scales: bool = False,
        scale_gain: float = 10.0,
        start_step: int = 0,
        freeze_ranges_step: int | None = None,
        export_dir: str = "student_quantized",
    ) -> None:
        super().__init__()
        skip, modules = list(skip) if skip is not None else None, list(modules) if modules is not None else None
        self.spec = schemes.make_spec(scheme, group_size, skip, FIELD, modules, gguf_types, module_schemes)
        self.spec = with_learned_scales(self.spec, learn_scales, scale_gain)
        check_steps(self.spec, start_step, freeze_ranges_step, calibration_batches)
        self.target = check_budget(self.spec, target_ratio, gguf_types, target_bytes, budget_grids, budget_probe)
        self.init = check_init(self.spec, init)
        self.calibration_batches = calibration_batches
        self.type_map: TypeMap | None = None
        self.start_step = start_step
        self.end_step = start_step  # the structure is final once fake-quant is in (see check_schedule)
        self.freeze_ranges_step = freeze_ranges_step
        self.export_dir = export_dir
        self.converted = False
        self.gguf_types: dict[str, str] = {}  # after convert on a llama.cpp grid: weight → type, for the GGUF export
        self.gguf_blocks: dict = {}  # after convert: the bytes of weights with trained scales, for the GGUF export
        self._frozen: dict[str, dict[str, torch.Tensor]] = {}
        self._pending_frozen: dict[str, dict[str, torch.Tensor]] | None = None
        self._convert_gathered = False  # FSDP / ZeRO-3: convert waits for the gathered student (finish_gathered)

    @property
    def state_key(self) -> str:
        """One QAT callback per run (check_schedule enforces it), so the class name identifies its state."""
        return type(self).__name__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the settings against the model and, for ``start_step=0``, prepare before strategy wrapping."""
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a start_step the run never reaches, and targets or a group size that do not fit the student."""
        if not trainer.fast_dev_run and 0 <= trainer.max_steps <= self.start_step:
            never = f"QAT would never run: trainer.max_steps={trainer.max_steps}; give a start_step below it"
            raise config_error(FIELD + "start_step", self.start_step, never)
        if self.spec.scale_gain and self.start_step > 0 and trainer.world_size > 1:  # new Parameters: re-wrap
            raise config_error(FIELD + "start_step", self.start_step, "learned scales under DDP/FSDP need 0")
        others = [cb for cb in compression_stages(trainer.callbacks) if cb is not self]
        if others:  # earlier stages may still reshape the linears; then the check waits for prepare
            return
        if self.target is not None:  # the map only gives a module a type its rows take
            schemes.check_targets(pl_module.student, self.spec.skip, None, FIELD, self.spec.modules)
        else:
            schemes.check_spec(pl_module.student, self.spec, FIELD)

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Insert fake-quant; the weights stay the same objects, so only learned scales need the optimizer rebuilt."""
        if self.target is not None:
            self._choose_types(trainer, pl_module)
        starts: dict = {}  # init=imatrix: the scales llama.cpp chose, where learned scales start
        if self.init == "imatrix":  # a hand-made map has no importance yet: collect what the budgeted map would
            importance = (self.type_map.importance if self.type_map else None) or calibrated_importance(
                pl_module.student, self.spec, trainer.datamodule, self.calibration_batches
            )
            count = start_from_imatrix(pl_module.student, self.spec, importance, starts)
            rank_zero_info(f"QAT starts from llama.cpp's importance-weighted rounding of {count} weights")
        prepare(pl_module.student, self.spec, starts)
        if rebuild and self.spec.scale_gain:
            pl_module.rebuild_optimizers()
        pl_module.record_structure_change(self.stage, self.spec.to_dict())
        rank_zero_info(prepared_summary(pl_module.student, self.spec))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Prepare at ``start_step``; freeze weight ranges at ``freeze_ranges_step``."""
        super().on_train_batch_start(trainer, pl_module, *args)
        if self._pending_frozen is not None:  # restored from a checkpoint
            self._apply_frozen(pl_module, self._pending_frozen)
            self._pending_frozen = None
        if self.freeze_ranges_step is not None and trainer.global_step >= self.freeze_ranges_step and not self._frozen:
            self._freeze(pl_module, trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run torchao's convert: the student now holds real low-bit weights."""
        if not self.is_applied(pl_module.structure) or not fake_quantized(pl_module.student):
            return  # never reached start_step (e.g. fast_dev_run); export_compact says so if asked
        # FSDP / ZeRO-3 (scale_out.md): each rank holds flat shards, which convert cannot round by rows; train.py
        # converts the gathered student instead (finish_gathered).
        self._convert_gathered = is_sharded(trainer.strategy.model)
        if not self._convert_gathered:
            self._convert(pl_module.student)

    def finish_gathered(self, student: torch.nn.Module) -> None:
        """Convert the gathered plain student on rank 0 (FSDP / ZeRO-3): the fake-quant again, then convert."""
        if not self._convert_gathered:
            return
        if not fake_quantized(student):  # gather_student replays the structure log, fake-quant included
            prepare(student, self.spec)  # the spec as trained (with a byte budget: the map every rank trained on)
        if self._frozen:
            freeze_ranges(student, self._frozen)
        self._convert(student)

    def _convert(self, student: torch.nn.Module) -> None:
        self.gguf_blocks = learned_blocks(student)
        self.gguf_types = convert(student, self.spec)
        self.converted = True
        rank_zero_info(converted_summary(student, self.spec, self.gguf_types))

    def _choose_types(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The byte-budgeted type map of the student as it is now, made the spec's ``gguf_types``."""
        self.spec, self.type_map = shared_spec_on_budget(
            pl_module.student,
            self.spec,
            trainer.datamodule,
            self.target,
            getattr(pl_module, "tokenizer", None),
            self.calibration_batches,
        )
        rank_zero_info(f"QAT type map for {self.target}: {self.type_map.summary()}")

    def state_dict(self) -> dict[str, Any]:
        """The frozen weight ranges (they are not in the model's state dict)."""
        return {"frozen": {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in self._frozen.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep restored frozen ranges until the first batch (the model is ready by then)."""
        self._pending_frozen = state_dict.get("frozen") or None

    def artifacts(self) -> list[QuantizedStudent]:
        """The scheme as trained, for the torchao and GGUF exports."""
        return [QuantizedStudent(self.spec, self.converted, dict(self.gguf_types), dict(self.gguf_blocks))]

    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """A plain copy with dequantized weights for the standard export (``int8_dynact_*``: fp activations)."""
        if not self.converted or self.gguf_types:  # a llama.cpp grid leaves plain modules holding the grid values
            return model
        return quantized.dequantized_copy(model, self.spec)

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write the quantized student (torchao tensors + ``quantization.json``, checked to reload) under ``run_dir``.

        Reload it with :func:`distill.export.quantized.load_quantized`. A llama.cpp grid's is the GGUF file (None).
        """
        if not self.converted:
            raise RuntimeError(
                f"QAT never converted the student (start_step={self.start_step} was not reached), "
                "so there is no quantized model to export"
            )
        if self.gguf_types:
            why = "the compact form of a llama.cpp grid is the GGUF file that export.formats=[hf,gguf] writes"
            rank_zero_info(f"{self.spec.scheme}: {why}; no torchao folder is written")
            return None
        return quantized.save_checked(model, tokenizer, Path(run_dir) / self.export_dir, self.spec)

    def _freeze(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> None:
        # FSDP / ZeRO-3: the ranges are read from whole weights, gathered for the moment (params_whole).
        with params_whole(trainer.strategy.model if trainer is not None else None, pl_module.student):
            ranges = current_ranges(pl_module.student)
        self._apply_frozen(pl_module, ranges)

    def _apply_frozen(self, pl_module: pl.LightningModule, frozen: dict[str, dict[str, torch.Tensor]]) -> None:
        freeze_ranges(pl_module.student, frozen)
        self._frozen = frozen
