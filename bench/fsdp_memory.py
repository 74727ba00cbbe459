"""Peak host memory per rank under ``trainer=fsdp_sim``: the teacher read by rank 0 only, or by every rank.

Runs ``train.py`` twice on 2 CPU ranks with a random teacher big enough to stand out from the interpreter's
own footprint, once with ``trainer_extras.teacher_on_rank_zero=true`` (the default: ranks > 0 build the
models empty and are filled unit by unit, distill/runtime/rank_zero_load.py) and once with ``false``
(every rank builds the whole teacher before FSDP shards it). Each rank logs its peak resident set size
(``ru_maxrss``) after training; this prints them with the teacher's size and writes
``bench/results/fsdp_memory.json``.

    python bench/fsdp_memory.py [--hidden 1024 --layers 8 --intermediate 4096]

What it cannot show on a laptop: the GPU side (each rank's device memory holds its shards either way) and
the time the broadcast takes over a real interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def teacher_params(hidden: int, layers: int, intermediate: int, vocab: int, heads: int = 4, kv_heads: int = 2) -> int:
    """Parameters of the random llama teacher (untied head, no biases), as transformers builds it."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def run(teacher_on_rank_zero: bool, args: argparse.Namespace, work: Path) -> dict[int, float]:
    """One 2-rank fsdp_sim run; returns rank → peak host memory in MiB."""
    out_dir = work / f"rank_zero_{teacher_on_rank_zero}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=smoke",
        "trainer=fsdp_sim",
        f"trainer_extras.teacher_on_rank_zero={str(teacher_on_rank_zero).lower()}",
        f"teacher.hidden_size={args.hidden}",
        f"teacher.num_layers={args.layers}",
        f"teacher.intermediate_size={args.intermediate}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "eval.enabled=false",
        "export.enabled=false",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={out_dir}",
        f"paths.cache_dir={work / 'cache'}",
        f"data.cache_dir={work / 'cache' / 'data'}",
    ]
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"run failed (teacher_on_rank_zero={teacher_on_rank_zero}):\n{text[-3000:]}")
    return {int(r): float(m) for r, m in re.findall(r"rank (\d) peak host memory (\d+) MiB", text)}


def main() -> None:
    """Measure both settings and print and save the peaks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=4096)
    args = parser.parse_args()
    params = teacher_params(args.hidden, args.layers, args.intermediate, vocab=512)
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {flag: run(flag, args, Path(tmp)) for flag in (True, False)}
    result = {
        "teacher_params": params,
        "teacher_fp32_mib": round(params * 4 / 2**20),
        "peak_mib_teacher_on_rank_zero": peaks[True],
        "peak_mib_every_rank_reads": peaks[False],
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "fsdp_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
