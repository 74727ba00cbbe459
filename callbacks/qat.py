"""Quantization-aware training (torchao) as a Lightning callback; the maths is :mod:`distill.compress.quant.qat`.

The student is fake-quantized from ``start_step`` while it distils and converted to real quantized weights at
the end of fit. Order with the other compression callbacks: prune → share → lowrank → sparsity → qat
(:data:`distill.compress.stages.STAGES`). QAT is last because every other stage rewrites the weights it would
otherwise have to quantize again; ``distill.compress.stages.check_schedule`` refuses a ``start_step`` before
an earlier stage's ``end_step``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from callbacks.base import OneShotCompression
from distill.compress.quant import schemes
from distill.compress.quant.qat import FIELD, convert, current_ranges, fake_quantized, freeze_ranges, prepare
from distill.compress.stages import compression_stages
from distill.config import config_error
from distill.export import quantized

log = logging.getLogger("distill")


class QuantizationAwareTraining(OneShotCompression):
    """Fake-quantize the student's linears during distillation (torchao QAT), convert them at fit end.

    Args:
        scheme: one of :data:`distill.compress.quant.schemes.SCHEMES` (``int8_weight_only``, ``int4_weight_only``,
            ``int8_dynact_int4_weight``, ``int8_dynact_int8_weight``), or llama.cpp's own block grids
            ``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q4_1`` (blocks of 32 with fp16 scales), ``gguf_q4_k``,
            ``gguf_q3_k`` (super-blocks of 256); the GGUF export then writes the trained weights as they are
            (docs/deploy.md).
        group_size: 32, 64 or 128 for the grouped int4 schemes (default 32); must divide the in-features of
            every quantized linear. Leave null for per-row schemes.
        skip: glob patterns (``fnmatch``) on the student's dotted module names that stay in full precision;
            null means :data:`distill.compress.quant.schemes.DEFAULT_SKIP` (embeddings, ``lm_head``, norms).
        modules: module kinds to fake-quantize: ``[linear]`` (default) or ``[linear, embedding]`` (weight-only
            schemes). The embedding also needs a ``skip`` list without ``*embed*``; a tied output head
            (``lm_head``, a Linear) shares its Parameter, gets the same codes and stays tied in the export.
        gguf_types: for ``gguf_*`` schemes, ``{module-name glob: llama.cpp type}`` overriding the scheme's
            type per module (the last matching glob wins), for a mixed file; null keeps one type.
        start_step: global step at which fake-quant is inserted; before it the student trains in full
            precision. 0 inserts it in ``setup``, before the strategy wraps the model (needed for FSDP).
        freeze_ranges_step: global step from which the weight scales/zero points stop following the weights
            (they are computed once from the weights at that step); null keeps them dynamic. Per-token
            activation ranges are always dynamic.
        export_dir: folder name under the run directory for the compact quantized export.

    """

    stage = "qat"

    def __init__(
        self,
        scheme: str = "int8_dynact_int4_weight",
        group_size: int | None = None,
        skip: list[str] | None = None,
        modules: list[str] | None = None,
        gguf_types: dict[str, str] | None = None,
        start_step: int = 0,
        freeze_ranges_step: int | None = None,
        export_dir: str = "student_quantized",
    ) -> None:
        super().__init__()
        self.spec = schemes.make_spec(
            scheme,
            group_size,
            list(skip) if skip is not None else None,
            FIELD,
            list(modules) if modules is not None else None,
            dict(gguf_types) if gguf_types else None,
        )
        if not isinstance(start_step, int) or start_step < 0:
            raise config_error(FIELD + "start_step", start_step, "give a global step >= 0")
        if freeze_ranges_step is not None and (
            not isinstance(freeze_ranges_step, int) or freeze_ranges_step < start_step
        ):
            raise config_error(
                FIELD + "freeze_ranges_step",
                freeze_ranges_step,
                f"give a global step >= start_step ({start_step}), or null to keep ranges dynamic",
            )
        if freeze_ranges_step is not None and schemes.get_scheme(self.spec.scheme).gguf is not None:
            raise config_error(
                FIELD + "freeze_ranges_step",
                freeze_ranges_step,
                f"{self.spec.scheme} computes each block's scale from its weights, as llama.cpp does when it "
                "writes the file; leave it null",
            )
        self.start_step = start_step
        self.end_step = start_step  # the structure is final once fake-quant is in (see check_schedule)
        self.freeze_ranges_step = freeze_ranges_step
        self.export_dir = export_dir
        self.converted = False
        # {weight name: GGUF type} after a convert on a llama.cpp grid (gguf_* schemes); the GGUF export reads it.
        self.gguf_types: dict[str, str] = {}
        self._frozen: dict[str, dict[str, torch.Tensor]] = {}
        self._pending_frozen: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def state_key(self) -> str:
        """One QAT callback per run (check_schedule enforces it), so the class name identifies its state."""
        return type(self).__name__

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the settings against the model and, for ``start_step=0``, prepare before strategy wrapping."""
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a start_step the run never reaches, and targets or a group size that do not fit the student."""
        if not trainer.fast_dev_run and 0 <= trainer.max_steps <= self.start_step:
            raise config_error(
                FIELD + "start_step",
                self.start_step,
                f"QAT would never run: trainer.max_steps={trainer.max_steps}; give a start_step below it",
            )
        others = [cb for cb in compression_stages(trainer.callbacks) if cb is not self]
        if not others:  # earlier stages may still reshape the linears; then the check waits for prepare
            schemes.check_spec(pl_module.student, self.spec, FIELD)

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Insert fake-quant; the Parameters stay the same objects, so the optimizer needs no rebuild."""
        prepare(pl_module.student, self.spec)
        pl_module.record_structure_change(self.stage, self.spec.to_dict())
        rank_zero_info(
            f"QAT prepared ({self.spec.scheme}): {len(fake_quantized(pl_module.student))} fake-quantized "
            f"{' and '.join(self.spec.modules)} modules"
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Prepare at ``start_step``; freeze weight ranges at ``freeze_ranges_step``."""
        super().on_train_batch_start(trainer, pl_module, *args)
        if self._pending_frozen is not None:  # restored from a checkpoint
            self._apply_frozen(pl_module, self._pending_frozen)
            self._pending_frozen = None
        if self.freeze_ranges_step is not None and trainer.global_step >= self.freeze_ranges_step and not self._frozen:
            self._freeze(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run torchao's convert: the student now holds real low-bit weights."""
        if not self.is_applied(pl_module.structure) or not fake_quantized(pl_module.student):
            return  # never reached start_step (e.g. fast_dev_run); export_compact says so if asked
        self.gguf_types = convert(pl_module.student, self.spec)
        self.converted = True
        if self.gguf_types:
            rank_zero_info(
                f"QAT convert ({self.spec.scheme}): {len(self.gguf_types)} weights rounded to llama.cpp's grids "
                f"({', '.join(f'{n} {k}' for k, n in sorted(Counter(self.gguf_types.values()).items()))}); "
                "export.formats=[hf,gguf] writes them without a second rounding"
            )
            return
        report = quantized.size_report(pl_module.student)
        rank_zero_info(
            f"QAT convert ({self.spec.scheme}, group_size={self.spec.group_size}): "
            f"{int(report['quantized_weights'])} weights at {report['bits_per_weight']:.2f} stored bits each; "
            f"student {report['memory_bytes'] / 2**20:.2f} MiB in memory"
        )

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The frozen weight ranges (they are not in the model's state dict)."""
        return {"frozen": {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in self._frozen.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep restored frozen ranges until the first batch (the model is ready by then)."""
        frozen = state_dict.get("frozen") or {}
        self._pending_frozen = frozen or None

    # -- export -------------------------------------------------------------------------------
    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """A plain Hugging Face copy with dequantized weights, for ``train.py``'s standard export.

        For weight-only schemes it computes exactly what the quantized student computes. For ``int8_dynact_*``
        schemes it has the quantized weights but full-precision activations (plain transformers has no
        activation quantization); the compact export keeps both.
        """
        if not self.converted or self.gguf_types:  # a llama.cpp grid leaves plain modules holding the grid values
            return model
        if schemes.get_scheme(self.spec.scheme).act_bits is not None:
            log.warning(
                "the plain export of a %s student has its quantized weights but full-precision activations; "
                "load the compact export with distill.export.quantized.load_quantized for the exact model",
                self.spec.scheme,
            )
        return quantized.dequantized_copy(model)

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write the quantized student (torchao tensors in safetensors + ``quantization.json``) under ``run_dir``.

        Reload it with :func:`distill.export.quantized.load_quantized`; the write is checked to reload with
        identical logits.
        """
        if not self.converted:
            raise RuntimeError(
                f"QAT never converted the student (start_step={self.start_step} was not reached), "
                "so there is no quantized model to export"
            )
        if self.gguf_types:
            rank_zero_info(
                f"{self.spec.scheme}: the compact form of a llama.cpp grid is the GGUF file that "
                "export.formats=[hf,gguf] writes; no torchao folder is written"
            )
            return None
        if not quantized.plain_architecture(model):
            # load_quantized rebuilds the architecture from config.json; factorised layers are not in it.
            log.warning(
                "QuantizationAwareTraining: the student's layers differ from its config's architecture (low-rank "
                "factors), so no quantized export is written; the plain export holds the dequantized model"
            )
            return None
        out = quantized.save_quantized(model, tokenizer, Path(run_dir) / self.export_dir, self.spec)
        size = json.loads((out / quantized.META_FILE).read_text())["size"]
        rank_zero_info(
            f"quantized export {out}: weights file {size['disk_bytes'] / 2**20:.2f} MiB, "
            f"{size['disk_bits_per_weight']:.2f} bits per quantized weight on disk"
        )
        return out

    # -- range freezing -----------------------------------------------------------------------
    def _freeze(self, pl_module: pl.LightningModule) -> None:
        self._apply_frozen(pl_module, current_ranges(pl_module.student))

    def _apply_frozen(self, pl_module: pl.LightningModule, frozen: dict[str, dict[str, torch.Tensor]]) -> None:
        freeze_ranges(pl_module.student, frozen)
        self._frozen = frozen
