"""Peak host memory per rank under ``trainer=fsdp_sim``: the teacher read by rank 0 only, or by every rank.

Runs ``train.py`` twice on 2 CPU ranks with a random teacher big enough to stand out from the interpreter's
own footprint, once with ``trainer_extras.teacher_on_rank_zero=true`` (the default: ranks > 0 build the
models empty and are filled unit by unit, distill/runtime/rank_zero_load.py) and once with ``false``
(every rank builds the whole teacher before FSDP shards it). Each rank logs its peak resident set size
(``ru_maxrss``) after training; this prints them with the teacher's size and writes
``bench/results/fsdp_memory.json``.

    python bench/fsdp_memory.py [hidden=1024 layers=8 intermediate=4096 steps=2]

What it cannot show on a laptop: the GPU side (each rank's device memory holds its shards either way) and
the time the broadcast takes over a real interconnect.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import exit_on_config_error  # noqa: E402


def teacher_params(hidden: int, layers: int, intermediate: int, vocab: int, heads: int = 4, kv_heads: int = 2) -> int:
    """Parameters of the random llama teacher (untied head, no biases), as transformers builds it."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def peaks(teacher_on_rank_zero: bool, cfg: DictConfig, work: Path) -> dict[int, float]:
    """One 2-rank fsdp_sim run; returns rank → peak host memory in MiB."""
    out_dir = work / f"rank_zero_{teacher_on_rank_zero}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=smoke",
        "trainer=fsdp_sim",
        f"trainer_extras.teacher_on_rank_zero={str(teacher_on_rank_zero).lower()}",
        f"teacher.hidden_size={cfg.hidden}",
        f"teacher.num_layers={cfg.layers}",
        f"teacher.intermediate_size={cfg.intermediate}",
        f"trainer.max_steps={cfg.steps}",
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


def run(cfg: DictConfig) -> None:
    """Measure both settings; print and save the peaks."""
    params = teacher_params(cfg.hidden, cfg.layers, cfg.intermediate, vocab=512)
    with tempfile.TemporaryDirectory() as tmp:
        measured = {flag: peaks(flag, cfg, Path(tmp)) for flag in (True, False)}
    result = {
        "teacher_params": params,
        "teacher_fp32_mib": round(params * 4 / 2**20),
        "peak_mib_teacher_on_rank_zero": measured[True],
        "peak_mib_every_rank_reads": measured[False],
    }
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results" / "fsdp_memory.json").write_text(json.dumps(result, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/fsdp_memory")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))  # Hydra's record goes to the repository's logs/
    main()
