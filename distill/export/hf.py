"""Exporting the student as a plain Hugging Face folder that loads without this package."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.stages import CompressionStage, stage_order
from distill.loaders import load_pruned as load_pruned_module
from distill.loaders.load_pruned import LAYER_SHAPES_KEY, is_pruned_export, load_pruned
from distill.runtime.files import atomic_directory

log = logging.getLogger(__name__)


def export_student(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
) -> Path:
    """Write ``save_pretrained`` safetensors plus the tokenizer, atomically, and check the reload.

    The folder is assembled next to ``out_dir`` and swapped in only when complete, so a failed export
    never leaves a partial folder where a good one was. With ``verify``, the written folder is loaded
    back with plain ``AutoModelForCausalLM`` and its logits must match the in-memory student's.
    """
    with atomic_directory(out_dir) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(student.config, LAYER_SHAPES_KEY, None):
            # Per-layer widths (callbacks.prune.uniform=false): ship the loader that rebuilds them.
            shutil.copyfile(load_pruned_module.__file__, tmp / "load_pruned.py")
        if metadata is not None:
            (tmp / "distill.json").write_text(json.dumps(metadata, indent=2, default=str))
        if verify:
            diff = check_reload(student, tmp)
            log.info("verified the export: plain transformers reloads it with max |Δlogit| %.3g on the probe", diff)
    return Path(out_dir)


def plain_model(student: PreTrainedModel, stages: Sequence[CompressionStage]) -> PreTrainedModel:
    """The model that the plain Hugging Face export writes; the live student is left as it is.

    Stages that change how weights are stored (sharing, low-rank, quantization) are made plain in the
    reverse of the stages' order (:func:`~distill.compress.stages.stage_names`) (quantization first, then low-rank, then
    sharing), since each stage's ``make_plain`` expects the plain form of the stages after it.
    """
    model = student
    for stage in sorted(stages, key=lambda s: stage_order(s.stage), reverse=True):
        model = stage.make_plain(model)
    return model


def export_compact_forms(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stages: Sequence[CompressionStage],
    run_dir: str | Path,
) -> dict[str, Path]:
    """Let every compression stage write its compact form; returns ``{stage: folder}`` for those that did."""
    out = {}
    for stage in stages:
        if (path := stage.export_compact(student, tokenizer, Path(run_dir))) is not None:
            out[stage.stage] = Path(path)
    return out


def check_reload(student: PreTrainedModel, folder: str | Path, atol: float = 1e-5) -> float:
    """Reload ``folder`` with plain transformers and compare logits on a fixed probe; returns the max diff."""
    if is_pruned_export(folder):
        reloaded = load_pruned(folder, dtype=student.dtype)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=student.dtype).eval()
    return compare_logits(student, reloaded, f"exported model at {folder}", atol)


@torch.no_grad()
def compare_logits(expected: nn.Module, reloaded: nn.Module, what: str, atol: float = 1e-5) -> float:
    """Run both models on one fixed probe and require logits within ``atol``; returns the max difference.

    Every export (plain, compact, quantized) checks its reload with this. ``expected`` runs in eval mode
    and gets its train/eval mode back; ``reloaded`` is moved to ``expected``'s device. ``what`` names the
    export in the error (``"compact export at <folder>"``).
    """
    device = next(expected.parameters()).device
    vocab = expected.get_output_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = expected.training
    expected.eval()
    try:
        want = expected(input_ids=probe).logits.float()
    finally:
        expected.train(was_training)
    got = reloaded.to(device)(input_ids=probe).logits.float()
    diff = float((want - got).abs().max())
    if not diff <= atol:  # a NaN difference fails too
        raise RuntimeError(f"{what} does not reproduce the model it was written from (max |Δlogit| = {diff:.3g})")
    return diff
