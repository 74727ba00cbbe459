"""Baseline rows for the headline table, each measured by the recipes' own evaluation.

    python -m bench.baselines                                    # every baseline without a kept report
    python -m bench.baselines 'baselines=[ptq_int8,ptq_int4,ptq_int3]' force=true
    python -m bench.baselines 'baselines=[ptq_int4]' 'eval.tasks=[]' eval.max_batches=2   # seconds: checks the path

The settings are Hydra overrides of ``conf/bench/baselines.yaml``; the evaluation settings are
``conf/eval/default.yaml``'s, as for ``train.py``. Each baseline (the teacher in fp32, bf16 and as shipped,
torchao PTQ int8/int4/int3 with the embedding, bitsandbytes int8/nf4, the pruning recipe's student pruned
once with no healing) gets a deployable artifact and a report against the fp32 teacher in
``runs_root/baseline_<label>/``; report.json and report.md are copied to ``out/baseline_<label>/``
(default ``bench/results/headline_runs/``), where ``bench/headline.py`` finds them. What each baseline is:
:mod:`bench.studies.baselines`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.baselines import run
from distill.config import exit_on_config_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/baselines")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        for label, report in run(cfg).items():
            student = report["metrics"]["student"]
            unavailable = report["run"].get("unavailable")
            summary = unavailable or ", ".join(
                f"{k.split('/')[-1]} {student[k]:.4g}"
                for k in ("heldout/top1_agreement", "heldout/kl_to_teacher", "cost/bytes_disk", "cost/bytes_memory")
                if student.get(k) is not None
            )
            print(f"{label}: {summary}", flush=True)


if __name__ == "__main__":
    # The repository, wherever the script is started from: the reports and Hydra's record live there.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
