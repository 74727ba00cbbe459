"""QAT against PTQ on the embedded default: how much of the post-training quantization loss QAT recovers.

Three students, all distilled from the SmolLM2-135M teacher on the embedded corpus, scored on the same
held-out batches:

* **fp**: a ``from_teacher`` student distilled for ``steps`` steps in full precision;
* **ptq**: that fp student quantized afterwards with ``python -m distill.export.ptq``'s code (no training);
* **qat**: the same student distilled for the same ``steps`` with ``callbacks=qat`` (fake-quant from
  ``qat_start``), converted to real quantized weights at the end.

It prints held-out perplexity and top-1 agreement with the teacher for each, the stored bits per quantized
weight and the weights file size, and the fraction of the PTQ gap QAT recovers:
``(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp)``.

    python -m bench.qat_vs_ptq                                  # 4-layer student, 40 steps, 8da4w g32
    python -m bench.qat_vs_ptq layers=6 steps=60 scheme=int4_weight_only group_size=64
    python -m bench.qat_vs_ptq layers=1 steps=10 'overrides=["experiment=smoke"]'   # seconds: checks the script

The settings are Hydra overrides of ``conf/bench/qat_vs_ptq.yaml``; ``overrides`` go on to both runs'
``conf/train.yaml`` (each in double quotes: Hydra's list syntax takes no bare ``=``).

Sized for a shared 2-core CPU (a few minutes per trained student): checkpointing and periodic validation
are off; the held-out evaluation uses ``eval_batches`` validation batches of ``batch_size`` sequences.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
from omegaconf import DictConfig, open_dict

from bench import ROOT
from bench.studies.recipe import compose_train
from distill.compress.quant.schemes import QuantSpec, make_spec
from distill.config import exit_on_config_error
from distill.eval.heldout import heldout_metrics
from distill.export.ptq import quantize_export
from distill.export.quantized import META_FILE
from train import train


def run_train(name: str, overrides: list[str], bench: DictConfig, out: Path) -> tuple[dict, dict, float]:
    """One ``train(cfg)`` on the default setup with the bench's size overrides (``bench``: this script's config)."""
    cfg = compose_train(
        [
            *([bench.overrides] if isinstance(bench.overrides, str) else bench.overrides),
            *overrides,
            f"student.num_layers={bench.layers}",
            f"trainer.max_steps={bench.steps}",
            f"data.batch_size={bench.batch_size}",
            f"data.eval_batch_size={bench.batch_size}",
            f"eval.max_batches={bench.eval_batches}",
            # Only the held-out metrics: tasks, generation fidelity and speed runs of the 30-layer
            # teacher would triple the time of each run on a shared CPU.
            "eval.tasks=[]",
            "eval.new_tokens=0",
            "eval.speed_runs=0",
        ],
        out / name,
    )
    if bench.progress:  # debug=quiet drops the bar; progress=true brings it back
        with open_dict(cfg):
            cfg.callbacks.progress_bar = {"_target_": "callbacks.progress.BudgetProgressBar", "refresh_rate": 1}
    start = time.perf_counter()
    metrics, objects = train(cfg)
    return metrics, objects, time.perf_counter() - start


def _size(folder: Path) -> dict:
    """The sizes ``save_quantized`` measured and wrote to ``quantization.json``."""
    return json.loads((folder / META_FILE).read_text())["size"]


def run(cfg: DictConfig) -> dict:
    """Run fp, PTQ and QAT and print the comparison (and write it as JSON next to the runs); returns it."""
    spec = make_spec(cfg.scheme, cfg.group_size, None)  # a bad scheme fails before anything is written
    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="qat_vs_ptq-"))
    gs = "null" if spec.group_size is None else spec.group_size

    fp_metrics, fp, fp_s = run_train("fp", [], cfg, out)
    start = time.perf_counter()
    ptq_model, ptq_dir = quantize_export(fp["export_dir"], spec.scheme, spec.group_size, out=out / "fp" / "ptq")
    vocab = fp["module"].vocab_size
    ptq_eval = heldout_metrics(
        {"ptq": ptq_model},
        fp["teacher"],
        fp["datamodule"].heldout_dataloader("test", cfg.eval_batches),
        vocab,
        eos_token_id=fp["teacher"].tokenizer.eos_token_id,
    )["ptq"]
    ptq_s = time.perf_counter() - start
    del fp["trainer"], fp["module"]
    qat_metrics, _, qat_s = run_train(
        "qat",
        [
            "callbacks=qat",
            f"callbacks/qat={spec.scheme}",
            f"callbacks.qat.group_size={gs}",
            f"callbacks.qat.start_step={cfg.qat_start}",
        ],
        cfg,
        out,
    )

    def row(metrics: dict, who: str) -> dict:
        return {k: metrics[f"heldout/{who}/{k}"] for k in ("ppl", "top1_agreement", "kl_to_teacher")}

    results = {
        "teacher": row(fp_metrics, "teacher"),
        "fp": {
            **row(fp_metrics, "student"),
            "weights_bytes": (Path(fp["export_dir"]) / "model.safetensors").stat().st_size,
            "seconds": fp_s,
        },
        "ptq": {
            **{k: ptq_eval[k] for k in ("ppl", "top1_agreement", "kl_to_teacher")},
            **_size(ptq_dir),
            "seconds": ptq_s,
        },
        "qat": {
            **row(qat_metrics, "student"),
            **_size(out / "qat" / "student_quantized"),
            "seconds": qat_s,
        },
    }
    return summarize(cfg, spec, results, ptq_eval["tokens"], out)


def summarize(cfg: DictConfig, spec: QuantSpec, results: dict, eval_tokens: float, out: Path) -> dict:
    """Write ``qat_vs_ptq.json`` into ``out`` and print the comparison table; returns the summary."""
    gap = results["ptq"]["ppl"] - results["fp"]["ppl"]
    recovered = (results["ptq"]["ppl"] - results["qat"]["ppl"]) / gap if gap > 0 else float("nan")
    summary = {
        "scheme": spec.scheme,
        "group_size": spec.group_size,
        "layers": cfg.layers,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "eval_batches": cfg.eval_batches,
        "qat_start": cfg.qat_start,
        "eval_tokens": eval_tokens,
        "recovered_fraction": recovered,
        "results": results,
    }
    (out / "qat_vs_ptq.json").write_text(json.dumps(summary, indent=2))

    print(
        f"\nQAT vs PTQ: {spec.scheme} (group_size={spec.group_size}), {cfg.layers}-layer student, "
        f"{cfg.steps} steps each, batch {cfg.batch_size}, {int(summary['eval_tokens'])} held-out tokens"
    )
    print(
        f"{'model':<8}{'ppl':>10}{'top1_agree':>12}{'kl':>9}{'bits/w mem':>11}{'bits/w disk':>12}"
        f"{'file MiB':>10}{'time s':>8}"
    )
    for name in ("teacher", "fp", "ptq", "qat"):
        r = results[name]
        mem = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else ("32" if name == "fp" else "-")
        disk = f"{r['disk_bits_per_weight']:.2f}" if "disk_bits_per_weight" in r else ("32" if name == "fp" else "-")
        size = r.get("disk_bytes", r.get("weights_bytes"))
        mib = f"{size / 2**20:.2f}" if size else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(
            f"{name:<8}{r['ppl']:>10.3f}{r['top1_agreement']:>12.4f}{r['kl_to_teacher']:>9.4f}"
            f"{mem:>11}{disk:>12}{mib:>10}{secs:>8}"
        )
    print(f"PTQ gap: {gap:+.3f} ppl; QAT recovers {recovered:.1%} of it (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp)")
    print(f"runs and JSON under {out}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/qat_vs_ptq")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
