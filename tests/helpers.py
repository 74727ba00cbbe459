"""Callbacks used by tests through the config (``callbacks.<name>._target_``), and helpers shared by tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lm_eval.api.model import LM
from transformers import LlamaConfig, LlamaForCausalLM

# The recipes' models shrunk: 6 query heads in 3 KV groups (so "remove one head per group" is heads=3), and
# widths that int4 groups of 32 divide before and after pruning half the MLP channels.
TINY_MODELS = [
    "teacher=tiny_random",
    "student=tiny",
    "student.hidden_size=96",
    "student.num_layers=4",
    "student.num_heads=6",
    "student.num_kv_heads=3",
    "student.head_dim=32",
    "student.intermediate_size=128",
    "data.block_size=32",
    "data.batch_size=4",
]


# Plain SGD for comparisons across process counts: Adam's normalisation would turn 1e-7 differences in
# all-reduced gradients into full-size steps on near-zero ones.
SGD = [
    "distill.optimizer._target_=torch.optim.SGD",
    "~distill.optimizer.betas",
    "distill.optimizer.weight_decay=0.0",
    "distill.optimizer.lr=0.5",
]


class CrashAtStep(pl.Callback):
    """Raise at the start of a given global step, to simulate a job killed mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise SystemExit(f"simulated crash at step {self.step}")


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    """All rows of every CSVLogger metrics.csv under ``output_dir``, in version order."""
    rows: list[dict[str, str]] = []
    for f in sorted(Path(output_dir).glob("csv/version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def stages(kinds: list[str]) -> list[str]:
    """Recorded changes with repeats folded: progressive pruning records one change per pruning step."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


class SwapParameterAt(pl.Callback):
    """At a given step, replace the student's final-norm weight by a new Parameter and rebuild the optimizer.

    Records what the optimizer held before and after, for tests of ``DistillModule.rebuild_optimizers``.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict | None = None
        self.after: dict | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step != self.step or self.before is not None:
            return
        import torch

        norm = pl_module.student.model.norm
        old = norm.weight
        opt = trainer.optimizers[0]
        self.before = {
            "exp_avg": opt.state[old]["exp_avg"].clone(),
            "lr": opt.param_groups[0]["lr"],
            "sched_step": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "n_params": sum(len(g["params"]) for g in opt.param_groups),
        }
        norm.weight = torch.nn.Parameter(old.detach().clone())
        pl_module.rebuild_optimizers({norm.weight: (old, lambda t: t * 2)})
        opt = trainer.optimizers[0]
        self.after = {
            "exp_avg": opt.state[norm.weight]["exp_avg"].clone(),
            "lr": opt.param_groups[0]["lr"],
            "sched_step": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "has_new": any(p is norm.weight for g in opt.param_groups for p in g["params"]),
            "has_old": any(p is old for g in opt.param_groups for p in g["params"]),
            "n_params": sum(len(g["params"]) for g in opt.param_groups),
        }


def crash_at(cfg, step: int) -> None:
    """Run ``train(cfg)`` with a :class:`CrashAtStep` callback and check that it died at ``step``."""
    import pytest
    from omegaconf import open_dict

    from train import train

    with open_dict(cfg):
        cfg.callbacks.crash = {"_target_": "tests.helpers.CrashAtStep", "step": step}
    with pytest.raises(SystemExit, match="simulated crash"):
        train(cfg)


def assert_same_losses(full_dir: Path, cut_dir: Path, steps: int | None = None) -> None:
    """The resumed run logged the same train/loss at every step as the uninterrupted one."""
    import pytest

    full_loss = dict(series(read_metrics(full_dir), "train/loss"))
    cut_loss = dict(series(read_metrics(cut_dir), "train/loss"))
    assert set(full_loss) == set(cut_loss)
    if steps is not None:
        assert len(full_loss) == steps
    for step in full_loss:
        assert cut_loss[step] == pytest.approx(full_loss[step], rel=1e-5), step


def run_train_cli(args: list[str], cwd: Path, cache_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` in a fresh interpreter with the session's caches; assert it exits 0."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "train.py"),
            *args,
            f"paths.cache_dir={cache_dir}",
            f"data.cache_dir={cache_dir}/data",
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(root)},
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


class Oracle(LM):
    """An lm-eval LM that knows the answers it is given and gets everything else wrong."""

    def __init__(self, truths: set[tuple[str, str]]) -> None:
        super().__init__()
        self.truths = truths

    def loglikelihood(self, requests):
        return [(0.0, True) if tuple(r.args) in self.truths else (-100.0, False) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [0.0 for _ in requests]

    def generate_until(self, requests):
        return ["" for _ in requests]


def tiny_llama(seed: int = 0, **config: object) -> LlamaForCausalLM:
    """A 2-layer, width-64 Llama (4 query heads in 2 KV groups, 256 tokens) whose head is its embedding.

    ``config`` overrides any ``LlamaConfig`` field; the weights are drawn after ``torch.manual_seed(seed)``.
    """
    settings: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(settings | config)))
