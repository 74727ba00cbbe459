"""Callbacks used by tests through the config (``callbacks.<name>._target_``), and helpers shared by tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

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


from callbacks.progress import BudgetProgressBar  # noqa: E402 - after the helpers above, which need none of it


class BudgetBarSpy(BudgetProgressBar):
    """The budget bar, recording (bar position, bar total, global step) after every training batch."""

    seen: ClassVar[list[tuple[int, int, int]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        super().on_train_batch_end(trainer, *args)
        BudgetBarSpy.seen.append((self.train_progress_bar.n, self.train_progress_bar.total, trainer.global_step))


class DtypeProbe(pl.Callback):
    """Print the dtype the student's parameters train in (under ZeRO-3 bf16: the engine's bf16 copies)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtypes = sorted({str(p.dtype) for p in pl_module.student.parameters()})
        print(f"rank {trainer.global_rank} student trains in {','.join(dtypes)}", flush=True)


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


# A 4-step run with a checkpoint every 2 steps and 2 validations: the multi-process sims (fsdp_sim,
# deepspeed_sim) are compared with one process on it.
SIM_RUN = [
    "experiment=smoke",
    "distill.scheduler.num_warmup_steps=0",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.progress_bar=null",
    "eval.enabled=false",
]


def assert_sharded_run_matches(run: Path, single_dir: Path, single: dict, log: str, half_teacher: bool = True) -> None:
    """A 2-rank sharded run (``run``) against one process with twice the batch (``single_dir``, ``single``).

    Equal ``val/loss`` at each validation and the same logged ``student/params``; the export holds every
    tensor whole and equal to the one-process student's; with ``half_teacher``, each rank held about half the
    teacher's bytes (FSDP, ZeRO-3; ZeRO-2 keeps it whole).
    """
    import re

    import pytest
    from safetensors.torch import load_file

    sharded_val, single_val = (dict(series(read_metrics(d), "val/loss")) for d in (run, single_dir))
    assert len(sharded_val) == 2 and set(sharded_val) == set(single_val)
    for step, value in single_val.items():
        assert sharded_val[step] == pytest.approx(value, rel=1e-5), step
    # The student's size is the whole student's, not rank 0's shard or partition.
    params = [dict(series(read_metrics(d), "student/params")) for d in (run, single_dir)]
    assert params[0] == params[1] and params[1]
    own = single["student"].state_dict()
    exported = load_file(run / "student" / "model.safetensors")
    assert {k for k in own if k != "lm_head.weight"} <= set(exported)
    for k, v in exported.items():
        assert v.shape == own[k].shape, k  # whole tensors, not flat shards or partitions
        torch.testing.assert_close(v, own[k], rtol=1e-4, atol=1e-4)
    if not half_teacher:
        return
    held = {int(r): int(n) for r, n in re.findall(r"rank (\d) holds (\d+) bytes of the teacher", log)}
    whole = sum(p.numel() * p.element_size() for p in single["teacher"].parameters())
    assert set(held) == {0, 1}, log[-2000:]
    for n in held.values():
        assert 0.45 * whole <= n <= 0.55 * whole, (held, whole)


def assert_killed_run_resumes(run_args: Callable[..., list[str]], tmp_path: Path, cache_dir: Path) -> Path:
    """Train ``run_args(dir)`` whole, and again killed at step 3 then rerun; both end with the same weights.

    ``run_args(dir, *extra)`` gives the overrides of a run in ``dir``. Returns the killed run's checkpoint folder.
    """
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train_cli(run_args(full), tmp_path, cache_dir)
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAtStep", "+callbacks.crash.step=3"]
    died = run_train_cli(run_args(cut, *crash), tmp_path, cache_dir, check=False)
    assert died.returncode != 0 and "simulated crash at step 3" in died.stdout + died.stderr
    assert not (cut / "student").exists()
    resumed = run_train_cli(run_args(cut), tmp_path, cache_dir)  # resume=auto: the step-2 checkpoint
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_losses(full, cut, steps=4)
    a, b = load_file(full / "student" / "model.safetensors"), load_file(cut / "student" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    return cut / "checkpoints"


def free_port() -> int:
    """A TCP port free on this host now, for a test's torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train_cli(
    args: list[str], cwd: Path, cache_dir: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` in a fresh interpreter with the session's caches; ``check``: assert exit 0."""
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
    if check:
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
