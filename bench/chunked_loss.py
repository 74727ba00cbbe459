"""Peak memory and time of the chunked KD + CE loss against the naive one (forward + backward).

Each variant runs in a fresh subprocess, and its peak is the growth of the process's resident-set
high-water mark (``ru_maxrss``) over the step, after inputs and weights exist. That captures every
allocation torch makes, which Python's tracemalloc cannot see. The subprocess sets glibc's
``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so that every tensor buffer is its own mapping, returned to the
system when freed: otherwise freed heap memory stays resident and the high-water mark overstates
what was live at once.

    python -m bench.chunked_loss                       # SmolLM2 sizes: V=49152, d=576, B·T=2048
    python -m bench.chunked_loss vocab=128256 hidden=2048 tokens=4096

The settings are Hydra overrides of ``conf/bench/chunked_loss.yaml``; each subprocess is this script again
with ``variant=naive`` or ``variant=chunked``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import ROOT
from distill.config import exit_on_config_error
from distill.objective.divergences import get_divergence


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_variant(variant: str, vocab: int, hidden: int, tokens: int, chunk: int, loss: str) -> dict:
    """Measure one fwd+bwd of ``variant`` in this process (called in a fresh subprocess)."""
    import torch
    from torch import nn

    from distill.objective.objective import DistillationObjective

    torch.manual_seed(0)
    b, t = tokens // 256, 257  # T+1 positions so that B·T aligned rows = tokens
    h_s = torch.randn(b, t, hidden, requires_grad=True)
    h_t = torch.randn(b, t, hidden)
    head_s, head_t = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    head_t.requires_grad_(False)
    labels = torch.randint(0, vocab, (b, t))
    obj = DistillationObjective(loss=loss, alpha=0.5, temperature=2.0, chunk_size=chunk)
    # Gradient buffers of the inputs exist in both variants; allocate them before the baseline.
    h_s.grad = torch.zeros_like(h_s)
    head_s.weight.grad = torch.zeros_like(head_s.weight)
    base = _maxrss_mb()
    start = time.perf_counter()
    if variant == "naive":
        with torch.no_grad():
            t_logits = head_t(h_t)
        out = obj(head_s(h_s), t_logits, labels)
    else:
        flat = h_t[:, :-1].reshape(-1, hidden)
        out = obj.forward_chunked(h_s, head_s, lambda i, j: head_t(flat[i:j]), labels, vocab)
    out["loss"].backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "peak_mb": _maxrss_mb() - base, "seconds": seconds, "loss": out["loss"].item()}


def measure(cfg: DictConfig, variant: str) -> dict:
    """Run ``variant`` in a fresh subprocess of this script and return what it measured."""
    settings = [f"{key}={cfg[key]}" for key in ("vocab", "hidden", "tokens", "chunk", "loss")]
    # The subprocess's Hydra record goes below this run's, not into a run folder of its own.
    record = Path(cfg.paths.output_dir) / variant
    cmd = [sys.executable, "-m", "bench.chunked_loss", *settings, f"variant={variant}", f"hydra.run.dir='{record}'"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:  # a bad setting: pass on the subprocess's one-line error and its exit code
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cfg: DictConfig) -> None:
    """Run both variants in subprocesses and print one ratio line each (with ``variant`` set: that one, here)."""
    if cfg.variant:
        print(json.dumps(run_variant(cfg.variant, cfg.vocab, cfg.hidden, cfg.tokens, cfg.chunk, cfg.loss)))
        return
    get_divergence(cfg.loss, field="loss")  # a bad name fails here, before two subprocesses start
    res = {}
    for variant in ("naive", "chunked"):
        res[variant] = r = measure(cfg, variant)
        print(f"{variant:8s} peak +{r['peak_mb']:8.1f} MB  time {r['seconds']:6.2f} s  loss {r['loss']:.6f}")
    n, c = res["naive"], res["chunked"]
    print(f"V={cfg.vocab} d={cfg.hidden} B·T={cfg.tokens} chunk={cfg.chunk} loss={cfg.loss}")
    print(f"ratio peak_memory chunked/naive = {c['peak_mb'] / n['peak_mb']:.3f}")
    print(f"ratio time chunked/naive = {c['seconds'] / n['seconds']:.3f}")
    print(f"loss relative difference = {abs(c['loss'] - n['loss']) / abs(n['loss']):.2e}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/chunked_loss")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
