"""Resume after a crash equals the uninterrupted run, with and without each compression stage mid-schedule.

One run goes straight to the end; a second is killed at step 5 and continued from its step-4 checkpoint
(``resume=auto``). Both must log the same loss at every step and end with the same structure, the same
parameter ties and the same weights (quantized ones compared by their integer data and scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distill.compress.prune.surgery import layer_shapes
from distill.compress.quant.schemes import is_quantized
from evaluate import load_model
from tests.helpers import assert_same_losses, crash_at
from train import train


@dataclass(frozen=True)
class Case:
    """One resume scenario on the smoke config."""

    overrides: tuple[str, ...]
    at_crash: tuple[str, ...]  # the stages (repeats folded) already applied in the step-4 checkpoint
    steps: int = 8
    mid_schedule: bool = False  # the step-4 checkpoint holds only part of the schedule's changes
    frozen: int | None = None  # QAT: how many linears have frozen ranges in the step-4 checkpoint
    tied: bool = False  # the student ends with parameters shared between layers
    quantized: bool = False  # the student ends with real low-bit weights


# A 3-layer student with 4 query heads in 2 KV groups and 64 MLP channels: every pruning dimension has room.
PRUNE = (
    "callbacks=prune",
    "student.num_layers=3",
    "student.num_heads=4",
    "student.num_kv_heads=2",
    "student.intermediate_size=64",
    "callbacks.prune.heads=2",
    "callbacks.prune.channels=0.5",
    "callbacks.prune.layers=2",
    "callbacks.prune.end_step=8",
    "callbacks.prune.every_n_steps=2",
    "callbacks.prune.calib_batches=2",
)
CASES = {
    "distill_only": Case((), at_crash=()),
    # On-policy rows (GKD, λ = 0.5) and teacher-cached sequence-level rows: the resumed run samples the same
    # continuations (seeded by step and rank) and reads the teacher continuations the checkpoint published.
    "generation_on_policy": Case(
        (
            "distill.generation.student_fraction=0.5",
            "distill.generation.teacher_fraction=0.25",
            "distill.generation.max_new_tokens=12",
            "distill.generation.teacher_cache=${paths.output_dir}/seqkd",
        ),
        at_crash=(),
    ),
    # Tied mid-run (step 3), relaxed by LoRA: the checkpoint holds the ties, and resume rebuilds them.
    "share_lora": Case(
        ("student.num_layers=4", "callbacks=share", "callbacks.share.start_step=3", "callbacks.share.lora_rank=2"),
        at_crash=("share",),
        tied=True,
    ),
    # Progressive pruning: the crash falls between two pruning steps.
    "prune_uniform": Case((*PRUNE, "callbacks.prune.uniform=true"), at_crash=("prune",), steps=10, mid_schedule=True),
    "prune_per_layer": Case(
        (*PRUNE, "callbacks.prune.uniform=false"), at_crash=("prune",), steps=10, mid_schedule=True
    ),
    # Width pruning too, of a student whose lm_head is its embedding: the sliced tie and its Adam moments resume.
    "prune_hidden_tied": Case(
        (
            *PRUNE,
            "student.hidden_size=64",
            "student.tie_word_embeddings=true",
            "callbacks.prune.hidden=32",
            "callbacks.prune.hidden_multiple=8",
        ),
        at_crash=("prune",),
        steps=10,
        mid_schedule=True,
        tied=True,  # the embedding ↔ lm_head tie
    ),
    # A whitened low-rank budget after sharing: the factorisation (step 3) is restored, not recomputed.
    "share_lowrank": Case(
        (
            "student.num_layers=2",
            "student.intermediate_size=96",
            "callbacks=[share,lowrank]",
            "callbacks.share.pattern=all",
            "callbacks.lowrank.start_step=3",
            "callbacks.lowrank.calibration_batches=2",
        ),
        at_crash=("share", "lowrank"),
        tied=True,
    ),
    # Wanda weight sparsity pruned at steps 2, 4 and 6: the step-4 checkpoint holds the step-2 masks and the
    # activation statistics collected for step 4, which the resumed run must prune with.
    "sparsity_wanda_mid_schedule": Case(
        (
            "callbacks=sparsity",
            "callbacks.sparsity.start_step=2",
            "callbacks.sparsity.end_step=6",
            "callbacks.sparsity.every_n_steps=2",
            "callbacks.sparsity.calib_batches=2",
        ),
        at_crash=("sparsity",),
        mid_schedule=True,
    ),
    # QAT prepared at step 2 with ranges frozen from step 3 (all 7 linears of the 1-layer smoke student) ...
    "qat_delayed_start_frozen_ranges": Case(
        ("callbacks=qat", "callbacks.qat.start_step=2", "callbacks.qat.freeze_ranges_step=3"),
        at_crash=("qat",),
        frozen=7,
        quantized=True,
    ),
    # A llama.cpp grid from step 2 with trained block scales (the optimizer rebuilt around them): the checkpoint
    # holds the scales and their Adam moments, and resume replays the quantizers they load into.
    "qat_gguf_learned_scales_mid_run": Case(
        (
            "callbacks=qat",
            "callbacks.qat.scheme=gguf_q4_0",
            "callbacks.qat.group_size=null",
            "callbacks.qat.start_step=2",
            "callbacks.qat.learn_scales=true",
            "callbacks.qat.scale_gain=100",
        ),
        at_crash=("qat",),
        frozen=0,
    ),
    # ... and prepared in setup, before the first step, with ranges that keep following the weights.
    "qat_prepared_in_setup": Case(
        ("callbacks=qat", "callbacks.qat.start_step=0", "callbacks.qat.freeze_ranges_step=null"),
        at_crash=("qat",),
        frozen=0,
        quantized=True,
    ),
}


def _stages(structure: list[dict]) -> tuple[str, ...]:
    kinds = [c["kind"] for c in structure]
    return tuple(k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k)


def _ties(student: torch.nn.Module) -> list[list[str]]:
    """Names of the parameters that are one tensor, grouped: what sharing tied."""
    groups: dict[int, list[str]] = {}
    for name, p in student.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


def _weights(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor; a quantized weight as its integer data and scales."""
    out = {}
    for name, t in student.state_dict().items():
        if is_quantized(t):
            out[name + ".qdata"], out[name + ".scale"] = t.qdata.clone(), t.scale.clone()
        else:
            out[name] = t.detach().clone()
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path, case):
    common = (
        *case.overrides,
        f"trainer.max_steps={case.steps}",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "eval.enabled=false",
        "export.enabled=false",
    )
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    _, full = train(tiny_cfg(*common, output_dir=full_dir))

    crash_at(tiny_cfg(*common, output_dir=cut_dir), step=5)
    ckpt = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled objects in it
    assert ckpt["global_step"] == 4
    assert _stages(ckpt["student_structure"]) == case.at_crash
    if case.mid_schedule:
        assert len(ckpt["student_structure"]) < len(full["module"].structure)
    else:
        assert ckpt["student_structure"] == full["module"].structure
    if case.frozen is not None:
        assert len(ckpt["callbacks"]["QuantizationAwareTraining"]["frozen"]) == case.frozen

    # evaluate.py rebuilds the checkpoint's student from the config as built plus the structure log.
    model, _, changes = load_model(str(cut_dir / "checkpoints" / "last.ckpt"), None)
    assert changes == ckpt["student_structure"]
    saved = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    _, resumed = train(tiny_cfg(*common, "resume=auto", output_dir=cut_dir))
    assert resumed["trainer"].global_step == case.steps
    assert resumed["module"].structure == full["module"].structure  # e.g. QAT prepared once, not again on resume
    assert layer_shapes(resumed["student"]) == layer_shapes(full["student"])  # heads, KV heads, MLP channels
    assert_same_losses(full_dir, cut_dir, steps=case.steps)
    ties = _ties(full["student"])
    assert _ties(resumed["student"]) == ties and bool(ties) == case.tied
    a, b = _weights(full["student"]), _weights(resumed["student"])
    assert a.keys() == b.keys()
    assert any(k.endswith(".qdata") for k in a) == case.quantized
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
