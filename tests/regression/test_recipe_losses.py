"""Pinned training losses: every conf/experiment recipe, on tiny models, logs the same loss at every step.

Each recipe runs 12 fp32 steps from the config's fixed seed, on the tiny_random teacher and a small student,
with its compression schedule shrunk so that every stage it stacks acts within the run. The losses read back
from the run's CSV metrics must equal the pins below to rtol 1e-5 (as torchtune's recipe tests do): a
refactoring that changes no maths passes; anything that moves a number fails here first.

The pins were generated from commit 3008b25, the code before the issue-13 restructure, so they also prove
that the restructure left the numerics alone. To regenerate them after a change that is *meant* to alter
the numerics, print the new table instead of asserting, review it, and paste it over ``PINS``:

    DISTILL_REGEN_PINS=1 python -m pytest tests/regression -m "" -s -q

The regenerating run skips every test (with the new line as the reason), so it can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

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
PRUNE_BY_6 = ["callbacks.prune.heads=3", "callbacks.prune.end_step=6", "callbacks.prune.every_n_steps=2"]
# Per recipe: its overrides on top of QUIET, scheduling each compression stage inside the 12 steps.
RECIPES: dict[str, list[str]] = {
    "smoke": [],  # already tiny
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
# train/loss at steps 0..11, from commit 3008b25 (see the module docstring to regenerate).
PINS: dict[str, list[float]] = {
    "smoke": [
        3.134681,
        3.1214433,
        3.1203594,
        3.0739388,
        3.0354152,
        2.9771101,
        2.9814863,
        2.9651072,
        2.9554656,
        2.9511795,
        2.8862629,
        2.9410059,
    ],
    "distill_only": [
        3.1798911,
        3.1506438,
        3.2283506,
        3.0653419,
        2.9456444,
        2.9719088,
        2.9780917,
        2.9439306,
        2.9646101,
        2.9328091,
        2.8512526,
        2.9387169,
    ],
    "distill_prune": [
        3.1798911,
        3.1506438,
        3.2101672,
        3.0425911,
        2.9645071,
        2.9568646,
        2.9751415,
        2.9352434,
        2.9805896,
        2.9658551,
        2.8527317,
        2.923816,
    ],
    "distill_share": [
        3.1798911,
        3.1506438,
        3.2283506,
        3.0653419,
        2.9455881,
        2.9830184,
        2.9925957,
        2.9720349,
        2.9721122,
        2.901515,
        2.8717995,
        2.9283757,
    ],
    "distill_prune_qat4": [
        3.1798911,
        3.1506438,
        3.2101672,
        3.0425911,
        2.9645071,
        2.9568646,
        2.9751415,
        2.9352434,
        2.9792027,
        2.9745862,
        2.8539252,
        2.9244034,
    ],
    "stacked_max": [
        3.1798911,
        3.1506438,
        3.2099609,
        3.0420732,
        2.9632342,
        2.9570391,
        2.9870505,
        2.9662716,
        2.9788694,
        3.0541697,
        2.9103544,
        2.9706714,
    ],
    "llama3_8b_to_1b_slurm": [
        3.1253939,
        3.1656229,
        3.2411921,
        3.0090084,
        2.9734244,
        2.9565344,
        2.9132466,
        2.882633,
        2.8973663,
        2.9990637,
        2.8592398,
        2.8869274,
    ],
}


def recipe_cfg(recipe: str, out: Path, cache_dir: Path) -> DictConfig:
    """The recipe composed on tiny models, as ``python train.py experiment=<recipe> <overrides>`` would."""
    return compose_cfg([f"experiment={recipe}", *RECIPES[recipe], *QUIET], out, cache_dir)


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
    expected = [k for k in ("prune", "share", "lowrank", "qat") if cfg.callbacks.get(k)]
    assert stages([c["kind"] for c in objects["module"].structure]) == expected  # every stage acted in the run
    losses = series(read_metrics(tmp_path), "train/loss")
    assert [step for step, _ in losses] == list(range(STEPS))
    values = [loss for _, loss in losses]
    if REGEN:
        line = f"    {recipe!r}: {[round(v, 7) for v in values]!r},"  # float32 has ~7 digits
        print(line)
        pytest.skip(f"DISTILL_REGEN_PINS=1: printed the new pin, asserted nothing: {line.strip()}")
    assert recipe in PINS, f"{recipe}: no pinned losses; regenerate them (see this module's docstring)"
    assert values == pytest.approx(PINS[recipe], rel=1e-5)
