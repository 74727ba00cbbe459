"""Structured pruning, healed or not: one-shot vs progressive at the same distillation budget.

Takes the student of a default run (``python train.py``: SmolLM2-135M teacher, 6-layer ``from_teacher``
student) and prunes it to half its MLP channels and 6 of its 9 query heads per layer (3 of each 3-head
KV group; 25% is not reachable under GQA, so this removes a third of the heads) in three ways:

1. ``oneshot``: one-shot, scored on the first ``calib`` training batches, no healing;
2. ``oneshot_heal``: the same one-shot pruning at step ``calib``, then distillation to ``steps``;
3. ``progressive``: cubic schedule from step 0 to ``steps // 2`` every ``every`` steps, then healing,
   ``steps`` in total, as (2).

All three use activation importance (Minitron). For each it prints held-out perplexity, KL and top-1
agreement with the teacher (the default held-out evaluation, ``eval.max_batches=8``), parameter count,
and CPU tokens/s of a student forward pass (batch 8 × 128, no grad, median of ``reps``).

    python -m bench.prune_heal base=logs/train/runs/<default run>/student steps=12 every=2 calib=2

The settings are Hydra overrides of ``conf/bench/prune_heal.yaml``.

Sized for a shared 2-core CPU: with the defaults (12 steps) each trained variant took 10-15 minutes there
while five other jobs shared it (each variant loads the teacher, trains, and runs the held-out evaluation);
the whole script took 32 minutes. Results: bench/results/prune.md. Checkpointing and periodic
validation are off (they only cost time here).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bench import ROOT
from bench.studies.baselines import first_train_batches, prune_once
from bench.studies.recipe import compose_train
from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.prune.surgery import shapes
from distill.config import build, config_error, exit_on_config_error
from distill.eval.heldout import heldout_metrics
from train import train

TARGETS = ["callbacks.prune.heads=6", "callbacks.prune.channels=0.5", "callbacks.prune.importance=activation"]
VARIANTS = ("oneshot", "oneshot_heal", "progressive")


def compose_cfg(base: Path, out: Path, overrides: list[str]) -> DictConfig:
    return compose_train(["student=pretrained", f"student.path={base}", "export.enabled=false", *overrides], out)


@torch.no_grad()
def tokens_per_s(models: dict[str, torch.nn.Module], reps: int) -> dict[str, float]:
    """Median CPU throughput of a forward pass over one default-sized batch (8 × 128 tokens).

    The models take turns, rep by rep, so load from other processes on a shared machine hits them alike.
    """
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(input_ids=ids, use_cache=False)  # warm-up
    for _ in range(reps):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times[name].append(time.perf_counter() - start)
    return {name: ids.numel() / statistics.median(t) for name, t in times.items()}


def row(name: str, model: torch.nn.Module, metrics: dict[str, float], seconds: float) -> dict:
    """One result line (printed at once, so a long run shows its progress)."""
    s = shapes(model)
    r = {
        "variant": name,
        "params": s["params"],
        "heads": s["heads"],
        "kv_heads": s["kv_heads"],
        "channels": s["channels"],
        "ppl": metrics["ppl"],
        "kl": metrics["kl_to_teacher"],
        "top1": metrics["top1_agreement"],
        "seconds": seconds,
        "model": model,
    }
    print("DONE " + json.dumps({k: v for k, v in r.items() if k != "model"}), flush=True)
    return r


def untrained(base: Path, out: Path, calib: int) -> list[dict]:
    """The base student, and its one-shot pruning with no healing (scored on the first training batches)."""
    start = time.perf_counter()
    cfg = compose_cfg(base, out, [])
    torch.manual_seed(cfg.seed)
    teacher = build(cfg.teacher)
    student = build(cfg.student, teacher=teacher)
    data = build(cfg.data, tokenizer=teacher.tokenizer)
    data.setup("fit")
    vocab = min(teacher.vocab_size, student.get_output_embeddings().weight.shape[0])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        res = heldout_metrics(
            {"student": model},
            teacher,
            data.heldout_dataloader("test", cfg.eval.max_batches),
            vocab,
            eos_token_id=teacher.tokenizer.eos_token_id,
        )
        return res["student"]

    rows = [row("base (unpruned)", copy.deepcopy(student), evaluate(student), time.perf_counter() - start)]
    start = time.perf_counter()
    cb = ProgressiveStructuredPruning(heads=6, channels=0.5, importance="activation", end_step=calib)
    # The same batches the trained variants see at steps 0..calib-1 (bench/baselines.py's prune_noheal too).
    prune_once(student, cb, first_train_batches(data, calib, cfg.seed), calib)
    rows.append(row("oneshot", student, evaluate(student), time.perf_counter() - start))
    return rows


def trained(name: str, base: Path, out: Path, steps: int, overrides: list[str]) -> dict:
    cfg = compose_cfg(base, out / name, ["callbacks=prune", f"trainer.max_steps={steps}", *TARGETS, *overrides])
    start = time.perf_counter()
    metrics, objects = train(cfg)
    seconds = time.perf_counter() - start
    held = {k: metrics[f"heldout/student/{k}"] for k in ("ppl", "kl_to_teacher", "top1_agreement")}
    return row(name, objects["student"], held, seconds)


def check(cfg: DictConfig) -> list[str]:
    """Refuse a missing base folder or an unknown variant before any model loads; returns the variants."""
    if OmegaConf.is_missing(cfg, "base"):
        raise config_error("base", None, "required: python -m bench.prune_heal base=logs/train/runs/<run>/student")
    if not (Path(cfg.base) / "config.json").is_file():
        raise config_error("base", str(cfg.base), "no config.json there; give a run's exported student folder")
    variants = [cfg.variants] if isinstance(cfg.variants, str) else list(cfg.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise config_error("variants", unknown, f"choose from {', '.join(VARIANTS)}")
    return variants


def run(cfg: DictConfig) -> None:
    """Prune the base student each way the variants name, then print one table row per variant."""
    variants = check(cfg)
    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="bench-prune-"))
    # A private copy, so a concurrent run that rewrites the base folder cannot change it mid-benchmark.
    base = out / "base"
    shutil.copytree(cfg.base, base, dirs_exist_ok=True)
    rows: list[dict] = []
    if "oneshot" in variants:
        rows += untrained(base, out / "oneshot", cfg.calib)
    if "oneshot_heal" in variants:
        one = [
            f"callbacks.prune.start_step={cfg.calib}",
            f"callbacks.prune.end_step={cfg.calib}",
            f"callbacks.prune.calib_batches={cfg.calib}",
        ]
        rows.append(trained("oneshot_heal", base, out, cfg.steps, one))
    if "progressive" in variants:
        prog = [
            "callbacks.prune.start_step=0",
            f"callbacks.prune.end_step={cfg.steps // 2}",
            f"callbacks.prune.every_n_steps={cfg.every}",
            f"callbacks.prune.calib_batches={cfg.calib}",
        ]
        rows.append(trained("progressive", base, out, cfg.steps, prog))
    speed = tokens_per_s({r["variant"]: r.pop("model") for r in rows}, cfg.reps)
    for r in rows:
        r["tokens_per_s"] = speed[r["variant"]]
        print("RESULT " + json.dumps(r), flush=True)
    print(
        f"\n{'variant':<18}{'params':>12}{'heads':>7}{'kv':>4}{'MLP':>6}{'ppl':>10}{'KL':>8}{'top1':>8}"
        f"{'tok/s':>9}{'s':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:<18}{r['params']:>12,}{r['heads']:>7}{r['kv_heads']:>4}{r['channels']:>6}{r['ppl']:>10.2f}"
            f"{r['kl']:>8.3f}{r['top1']:>8.4f}{r['tokens_per_s']:>9.0f}{r['seconds']:>6.0f}"
        )
    print(f"{cfg.steps} distillation steps per trained variant; base: {cfg.base}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/prune_heal")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
