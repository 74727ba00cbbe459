"""Pinned training losses: every conf/experiment recipe, on tiny models, logs the same loss at every step.

Each recipe runs 12 fp32 steps from the config's fixed seed, on the tiny_random teacher and a small student,
with its compression schedule shrunk so that every stage it stacks acts within the run. The losses read back
from the run's CSV metrics must equal the pins below to rtol 5e-5 (torchtune's recipe tests use 1e-5) until a
fake-quant grid acts, 1e-4 at the first step through it, and to a wider, measured tolerance after it (see
``POST_QAT_RTOL``): a refactoring that changes no maths passes; anything that moves a number fails here first.

The pins were generated from commit 3008b25, the code before the issue-13 restructure, so they also proved
that the restructure left the numerics alone. Issue 14 regenerated them on purpose: the embedded corpus grew
(the standard library's docstrings joined the pydoc topics, and 15 % is held out), which changes the tiny
tokenizer and every batch; ``ce_only`` (alpha = 0) was added. Issue 15 added the QAD recipes and
regenerated ``distill_prune_qat4`` and ``stacked_max``: with torchao 0.18.0 (a fresh install) their losses
after QAT starts moved by up to 6e-5 relative, the same on the code before and after the issue's changes,
so the fake-quant rounding, not this code, moved them. The first clean-clone CI on an Intel Xeon (AVX-512)
then showed that past the QAT step no pin holds to 1e-5 across CPUs; the QAT recipes were regenerated there,
the QAD ones at their own learning rate, and ``qad_q4_0`` joined (later ``qad_int3_emb4``, with pins of its own
from its first commit). To regenerate them after a change that is *meant*
to alter the numerics, print the new table instead of asserting, review it, and paste it over ``PINS``:

    DISTILL_REGEN_PINS=1 python -m pytest tests/regression -m "" -s -q

The regenerating run skips every test (with the new line as the reason), so it can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from distill.compress.stages import stage_names
from tests.conftest import CONF, compose_cfg
from tests.helpers import TINY_MODELS, read_metrics, series, stages
from train import train

STEPS = 12
REGEN = os.environ.get("DISTILL_REGEN_PINS") == "1"

# Training only: no validation, evaluation, export or checkpoint, which change no training loss but cost time.
QUIET = [
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=0",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint=null",
    "eval.enabled=false",
    "export.enabled=false",
    "distill.optimizer.lr=0.01",
    "distill.scheduler.num_warmup_steps=0",
]
QAD_LR = "distill.optimizer.lr=2e-5"  # the QAD recipes' own rate; it overrides QUIET's (Hydra: the last one wins)
TINY_Q4_MIX = [
    "student.intermediate_size=256",
    "trainer.max_time=null",
    # The recipe chooses its map from a byte budget (tests/compress/quant/test_type_map.py); the pins hold the
    # numerics of training on one fixed mix of grids, as they did before the budget chose it.
    "callbacks.qat.target_ratio=null",
    "callbacks.qat.budget_probe=null",
    "+callbacks.qat.gguf_types={*.mlp.down_proj:q4_k,*.layers.1.mlp.down_proj:q3_k}",
]
PRUNE_BY_6 = ["callbacks.prune.heads=3", "callbacks.prune.end_step=6", "callbacks.prune.every_n_steps=2"]
# Per recipe: its overrides on top of QUIET, scheduling each compression stage inside the 12 steps.
RECIPES: dict[str, list[str]] = {
    "smoke": [],  # already tiny
    "ce_only": TINY_MODELS,
    "distill_only": TINY_MODELS,
    "distill_prune": [*TINY_MODELS, *PRUNE_BY_6],  # prunes at steps 0, 2, 4, 6
    "distill_share": [*TINY_MODELS, "callbacks.share.start_step=4"],
    "distill_prune_qat4": [*TINY_MODELS, *PRUNE_BY_6, "callbacks.qat.start_step=8"],
    "stacked_max": [
        *TINY_MODELS,
        "callbacks.prune.heads=3",
        "callbacks.prune.end_step=4",
        "callbacks.prune.every_n_steps=2",
        "callbacks.share.start_step=6",
        "callbacks.lowrank.start_step=8",
        "callbacks.qat.start_step=10",
    ],
    # The QAD recipes on the tiny student: every Linear and the embedding fake-quantized from step 0, in groups
    # of 32 (192 fits SmolLM2's widths, not the tiny student's); qad_int3 on it is int3 at the tiny depth. They
    # keep their own learning rate (QAD_LR): at QUIET's 0.01 their trajectories are chaotic (see CROSS_CPU_RTOL).
    "qad_int4": [*TINY_MODELS, "callbacks.qat.group_size=32", QAD_LR],
    "qad_int4_ce": [*TINY_MODELS, "callbacks.qat.group_size=32", QAD_LR],
    # qad_int3's wall-clock cosine follows the steps alone here (max_time null), so its pins are reproducible.
    "qad_int3": [*TINY_MODELS, "callbacks.qat.group_size=32", QAD_LR, "trainer.max_time=null"],
    # qad_int3 with the tied table on its own grid: int4 in groups of 96 fits the tiny student's 96-wide rows as is.
    "qad_int3_emb4": [*TINY_MODELS, "callbacks.qat.group_size=32", QAD_LR, "trainer.max_time=null"],
    "qad_q4_0": [*TINY_MODELS, QAD_LR],  # llama.cpp's blocks of 32 fit the tiny widths as they are
    # The mix on the tiny student: down_proj rows 256 wide take the K-quants (SmolLM2's layer globs match nothing
    # here), and the wall-clock schedule follows the steps alone (max_time null) so the pins are reproducible.
    "qad_q4_mix": [*TINY_MODELS, QAD_LR, *TINY_Q4_MIX],
    # Wanda weight sparsity cut at steps 2, 4 and 6 (the first after its 2 calibration batches), then healing.
    "distill_sparse": [
        *TINY_MODELS,
        QAD_LR,
        "callbacks.sparsity.start_step=2",
        "callbacks.sparsity.end_step=6",
        "callbacks.sparsity.every_n_steps=2",
    ],
    # The cluster recipe on one CPU process: FSDP and bf16 need GPUs, so the CPU trainer replaces its
    # trainer; its gradient accumulation and activation checkpointing still run.
    "llama3_8b_to_1b_slurm": [
        *TINY_MODELS,
        "~slurm",
        "trainer=cpu",
        "trainer.devices=1",
        "trainer.accumulate_grad_batches=2",
        "data=embedded",
        "~teacher.path",
        "~teacher.dtype",
        "~data.name",
        "~data.config_name",
        "data.num_workers=0",
        "student.head_dim=null",
        "student.num_heads=4",
        "student.num_kv_heads=2",
    ],
}
# train/loss at steps 0..11 (see the module docstring to regenerate). Regenerated when the data gained a test
# split (train/validation/test by document, val 0.05 and test 0.10 of the tokens): the training split, and with it
# every batch, changed.
PINS: dict[str, list[float]] = {
    "smoke": [
        3.1327345,
        3.097832,
        3.067008,
        3.0165377,
        2.9357948,
        2.9554894,
        2.9562905,
        2.9168723,
        2.9907525,
        2.9433036,
        2.9143631,
        2.9219363,
    ],
    "ce_only": [
        6.2364159,
        6.2252183,
        6.1490092,
        5.9014487,
        5.620749,
        5.5694189,
        5.5740972,
        5.5609846,
        5.7464843,
        5.6512198,
        5.4838581,
        5.5752211,
    ],
    "distill_only": [
        3.1340032,
        3.1236348,
        3.1214266,
        3.0983977,
        3.0127528,
        2.9395103,
        2.9477212,
        2.9656796,
        3.0402064,
        2.9634442,
        2.9231734,
        2.9535191,
    ],
    "distill_prune": [
        3.1340032,
        3.1236348,
        3.1048496,
        3.103925,
        3.0437601,
        2.9348207,
        2.9504161,
        2.9658682,
        3.0386784,
        2.9604983,
        2.9212148,
        2.9601593,
    ],
    "distill_share": [
        3.1340032,
        3.1236348,
        3.1214266,
        3.0983977,
        2.9964776,
        2.9815223,
        2.9148452,
        2.9855373,
        3.0170374,
        2.9500847,
        2.927052,
        2.9508913,
    ],
    "distill_prune_qat4": [
        3.1340032,
        3.1236348,
        3.1048496,
        3.103925,
        3.0437601,
        2.9348207,
        2.9504161,
        2.9658682,
        3.0387394,
        2.9602978,
        2.9208491,
        2.9598339,
    ],
    "stacked_max": [
        3.1340032,
        3.1236348,
        3.1052551,
        3.1036878,
        3.0864496,
        2.9306417,
        2.9490888,
        2.9593782,
        3.0228076,
        2.959235,
        2.9290547,
        2.947803,
    ],
    "qad_int4": [
        0.0317103,
        0.0314543,
        0.0318772,
        0.0312778,
        0.0309065,
        0.0312064,
        0.032349,
        0.0306513,
        0.0313273,
        0.0307184,
        0.0297935,
        0.0309456,
    ],
    "qad_int4_ce": [
        6.2352057,
        6.2349544,
        6.29392,
        6.2848067,
        6.2621789,
        6.2816753,
        6.2495866,
        6.2492995,
        6.2406569,
        6.2892222,
        6.2560458,
        6.2575207,
    ],
    "qad_int3": [
        0.0324676,
        0.031623,
        0.0324682,
        0.0319881,
        0.0315361,
        0.0321912,
        0.0316619,
        0.0311581,
        0.0327626,
        0.0318604,
        0.0315587,
        0.0310911,
    ],
    "qad_int3_emb4": [
        0.0320176,
        0.0316961,
        0.0323175,
        0.0315087,
        0.0316242,
        0.0317861,
        0.0319607,
        0.0311777,
        0.0327557,
        0.031514,
        0.030835,
        0.0308835,
    ],
    "qad_q4_0": [
        0.0317983,
        0.0314814,
        0.0315996,
        0.0314822,
        0.0311613,
        0.0309743,
        0.0321151,
        0.0308177,
        0.0314142,
        0.0313223,
        0.0300231,
        0.030566,
    ],
    "qad_q4_mix": [
        0.0325824,
        0.0322846,
        0.030166,
        0.031216,
        0.0318298,
        0.0305607,
        0.0322832,
        0.0316463,
        0.0323231,
        0.0306768,
        0.0321624,
        0.0299685,
    ],
    "distill_sparse": [
        0.0315834,
        0.0313732,
        0.0317291,
        0.0313304,
        0.0316668,
        0.0309093,
        0.031646,
        0.0305615,
        0.0319906,
        0.0315503,
        0.0306528,
        0.0315101,
    ],
    "llama3_8b_to_1b_slurm": [
        3.1216836,
        3.1109974,
        2.9799917,
        2.9476655,
        2.9641364,
        2.9589529,
        2.9237363,
        2.9405625,
        2.969553,
        2.8889668,
        2.9187543,
        2.9422469,
    ],
}


# The tolerance once a rounding grid has acted on an update, per recipe (default POST_QAT_RTOL). Until then every
# recipe reproduced its pins to 1e-5 on an AMD EPYC (AVX2) and an Intel Xeon (AVX-512); a later AMD EPYC with
# AVX-512 moved distill_only's step-4 loss by 1.5e-5, so the pins before the grid hold to PRE_QAT_RTOL = 5e-5
# (still 14x below what one optimizer step moves them: at least 7e-4 relative between distill_only's pinned steps).
# After it, it cannot: the kernels' float rounding differs between CPUs in the last bits, a weight that sits
# on a rounding boundary of the fake-quant grid lands on one side on one CPU and on the other side elsewhere,
# and Adam turns tiny gradient differences into full-size steps. Measured between the two CPUs (and, on one
# CPU, between ATen's AVX2 and AVX-512 kernels): the staged recipes move by up to 4e-5 relative; the QAD
# recipes, whose student starts as the teacher's own copy, by up to 50 % at QUIET's learning rate of 0.01 and
# by up to 4e-3 at their own 2e-5. The first forward through the grid is pinned to 1e-4 (1.2e-5 measured).
PRE_QAT_RTOL = 5e-5
POST_QAT_RTOL = 1e-3
CROSS_CPU_RTOL = {
    "qad_int4": 2e-2,
    "qad_int4_ce": 2e-2,
    "qad_int3": 2e-2,
    "qad_int3_emb4": 2e-2,
    "qad_q4_0": 2e-2,
    "qad_q4_mix": 2e-2,
}


def recipe_cfg(recipe: str, out: Path, cache_dir: Path) -> DictConfig:
    """The recipe composed on tiny models, as ``python train.py experiment=<recipe> <overrides>`` would."""
    return compose_cfg([f"experiment={recipe}", *QUIET, *RECIPES[recipe]], out, cache_dir)


def test_every_recipe_is_pinned():
    """A new conf/experiment recipe cannot go unpinned: it must be added to RECIPES and PINS."""
    recipes = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert recipes, f"no recipes found under {CONF / 'experiment'}"
    assert set(RECIPES) == recipes, f"RECIPES differs from conf/experiment: {sorted(set(RECIPES) ^ recipes)}"
    assert set(PINS) == recipes, f"PINS differs from conf/experiment: {sorted(set(PINS) ^ recipes)}"


@pytest.mark.parametrize("recipe", RECIPES)  # about 1-2 s each on 2 cores
def test_recipe_losses_match_the_pins(recipe, tmp_path, cache_dir):
    cfg = recipe_cfg(recipe, tmp_path, cache_dir)
    _, objects = train(cfg)
    assert objects["trainer"].global_step == STEPS
    expected = [k for k in stage_names() if cfg.callbacks.get(k)]
    assert stages([c["kind"] for c in objects["module"].structure]) == expected  # every stage acted in the run
    losses = series(read_metrics(tmp_path), "train/loss")
    assert [step for step, _ in losses] == list(range(STEPS))
    values = [loss for _, loss in losses]
    if REGEN:
        line = f"    {recipe!r}: {[round(v, 7) for v in values]!r},"  # float32 has ~7 digits
        print(line)
        pytest.skip(f"DISTILL_REGEN_PINS=1: printed the new pin, asserted nothing: {line.strip()}")
    assert recipe in PINS, f"{recipe}: no pinned losses; regenerate them (see this module's docstring)"
    qat = cfg.callbacks.get("qat")
    start = STEPS if not qat else int(qat.start_step)
    assert values[:start] == pytest.approx(PINS[recipe][:start], rel=PRE_QAT_RTOL)  # no rounding grid has acted yet
    # The first forward through the grid: weights equal to the last bits, a rare one rounded the other way.
    assert values[start : start + 1] == pytest.approx(PINS[recipe][start : start + 1], rel=1e-4)
    rtol = CROSS_CPU_RTOL.get(recipe, POST_QAT_RTOL)
    assert values[start + 1 :] == pytest.approx(PINS[recipe][start + 1 :], rel=rtol)
