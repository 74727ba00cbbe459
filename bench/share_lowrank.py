"""Cross-layer sharing and low-rank factorization on the embedded default: size against quality.

Runs ``train(cfg)`` on the default setup (SmolLM2-135M teacher, 6-layer ``from_teacher`` student, the
embedded corpus) once per configuration, for the same number of distillation steps, and prints for
each: unique student parameters, bytes on disk (plain Hugging Face export and, where there is one, the
compact export), held-out perplexity and top-1 agreement with the teacher.

    python -m bench.share_lowrank                       # all configurations, 20 steps each
    python -m bench.share_lowrank steps=40 'configs=[student,share_k2]'
    python -m bench.share_lowrank steps=0               # only the quality right after conversion

The settings are Hydra overrides of ``conf/bench/share_lowrank.yaml``.

Sized for a shared 2-core CPU: each configuration takes a few minutes there. Checkpointing and the
periodic validation are switched off (they only cost time here); the held-out evaluation is the
default one (``eval.max_batches=8``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.recipe import compose_train
from distill.compress.layers import decoder_layers
from distill.compress.lowrank import LOWRANK
from distill.compress.share import SHARE
from distill.compress.stages import compression_stages
from distill.config import build, config_error, exit_on_config_error, instantiate_callbacks
from distill.cost import parameter_count
from distill.eval.heldout import heldout_metrics
from train import train

CONFIGS: dict[str, list[str]] = {
    "student": [],
    "share_k2": ["callbacks=share", "callbacks.share.pattern=groups", "callbacks.share.group_size=2"],
    "share_k2_lora8": [
        "callbacks=share",
        "callbacks.share.pattern=groups",
        "callbacks.share.group_size=2",
        "callbacks.share.lora_rank=8",
    ],
    "share_k2_lora8_svd": [
        "callbacks=share",
        "callbacks.share.pattern=groups",
        "callbacks.share.group_size=2",
        "callbacks.share.lora_rank=8",
        "callbacks.share.lora_init=svd",
    ],
    "lowrank_50": ["callbacks=lowrank", "callbacks.lowrank.param_budget=0.5"],
    "lowrank_50_whitened": [
        "callbacks=lowrank",
        "callbacks.lowrank.param_budget=0.5",
        "callbacks.lowrank.calibration_batches=4",
    ],
}


def _compose(overrides: list[str]) -> DictConfig:
    return compose_train(overrides, tempfile.mkdtemp(prefix="bench-share-lowrank-conv-"), quiet=False)


def at_conversion(names: list[str], max_batches: int) -> list[dict]:
    """Held-out quality right after each compression, before any distillation step (one teacher pass)."""
    cfg = _compose([])
    teacher = build(cfg.teacher)
    dm = build(cfg.data, tokenizer=teacher.tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    models = {}
    for name in names:
        pl.seed_everything(cfg.seed)
        student = build(cfg.student, teacher=teacher)
        for cb in compression_stages(instantiate_callbacks(_compose(CONFIGS[name]).get("callbacks"))):
            if cb.stage == SHARE.name:
                cb.compress(student)
            elif cb.stage == LOWRANK.name:
                cb.compress(student, dm)
        models[name] = student
    vocab = min(teacher.vocab_size, next(iter(models.values())).get_output_embeddings().weight.shape[0])
    results = heldout_metrics(
        models, teacher, dm.heldout_dataloader("test", max_batches), vocab, eos_token_id=teacher.tokenizer.eos_token_id
    )
    return [
        {
            "config": name,
            "steps": 0,
            "unique_params": parameter_count(m),
            "ppl": results[name]["ppl"],
            "top1": results[name]["top1_agreement"],
            "kl": results[name]["kl_to_teacher"],
        }
        for name, m in models.items()
    ]


def run_config(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    """Distil for ``steps`` steps with one configuration; size and held-out quality of the result."""
    cfg = compose_train(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            # Held-out ppl / agreement only: the report's tasks, generation and speed runs cost minutes here.
            "eval.tasks=[]",
            "eval.new_tokens=0",
            "eval.speed_runs=0",
        ],
        out / name,
    )
    start = time.perf_counter()
    metrics, objects = train(cfg)
    seconds = time.perf_counter() - start
    student = objects["student"]
    plain = Path(objects["export_dir"]) / "model.safetensors"
    compact = out / name / "student_compact" / "model.safetensors"
    return {
        "config": name,
        "steps": steps,
        "unique_params": parameter_count(student),
        "unique_layer_params": parameter_count(decoder_layers(student)),
        "plain_bytes": plain.stat().st_size,
        "compact_bytes": compact.stat().st_size if compact.exists() else None,
        "ppl": metrics["heldout/student/ppl"],
        "top1": metrics["heldout/student/top1_agreement"],
        "kl": metrics["heldout/student/kl_to_teacher"],
        "teacher_ppl": metrics["heldout/teacher/ppl"],
        "seconds": seconds,
    }


def run(cfg: DictConfig) -> None:
    """Score each configuration at conversion, then after ``steps`` steps; print one table per part."""
    configs = [cfg.configs] if isinstance(cfg.configs, str) else list(cfg.configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise config_error("configs", unknown, f"choose from {', '.join(CONFIGS)}")
    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="bench-share-lowrank-"))
    if cfg.conversion_batches:
        print(f"\nAt conversion (no distillation yet), {cfg.conversion_batches} held-out batches:")
        print(f"{'config':<22}{'unique params':>15}{'ppl':>14}{'top1':>8}{'KL':>8}")
        for r in at_conversion(configs, cfg.conversion_batches):
            print("RESULT " + json.dumps(r), flush=True)
            print(f"{r['config']:<22}{r['unique_params']:>15,}{r['ppl']:>14.2f}{r['top1']:>8.4f}{r['kl']:>8.3f}")
    if not cfg.steps:
        return
    rows = []
    for name in configs:
        row = run_config(name, CONFIGS[name], cfg.steps, out)
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    mb = 1024 * 1024
    print(
        f"\n{'config':<22}{'unique params':>15}{'layer params':>14}{'plain MB':>10}{'compact MB':>12}"
        f"{'ppl':>10}{'top1':>8}{'KL':>8}{'s':>7}"
    )
    for r in rows:
        compact = f"{r['compact_bytes'] / mb:.1f}" if r["compact_bytes"] else "-"
        print(
            f"{r['config']:<22}{r['unique_params']:>15,}{r['unique_layer_params']:>14,}{r['plain_bytes'] / mb:>10.1f}"
            f"{compact:>12}{r['ppl']:>14.2f}{r['top1']:>8.4f}{r['kl']:>8.3f}{r['seconds']:>7.0f}"
        )
    print(f"teacher held-out ppl: {rows[0]['teacher_ppl']:.2f}; {cfg.steps} steps per configuration")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/share_lowrank")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
