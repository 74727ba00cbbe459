"""Bytes per token and reconstruction KL of the top-k teacher cache at k = 16, 64, 128, and when it pays for itself.

Runs the embedded SmolLM2 teacher over the first blocks of the embedded corpus's training split, builds one cache
per k, and (``crossover=true``) times, on the same blocks, the live teacher as the chunked loss runs it (its body,
then its output layer chunk by chunk) and the cache's lookups at the KD temperature. For quantization-aware
distillation the student is the teacher's size and trains the same either way; only the teacher's side changes, so

    E* = B / (L - R)    epochs

where B is the build of the cache over one epoch of training blocks, L the live teacher's forward over one epoch
and R the cache's lookups over one epoch (each measured per block here and scaled to the split's blocks). From E*
epochs on, the cache built once costs less than running the teacher every epoch; below it, recomputing wins. A run
budgeted by wall clock (trainer.max_time) that sees fewer than E* epochs of data should keep the live teacher.

    python -m bench.teacher_cache                 # 32 blocks × 128 tokens per k
    python -m bench.teacher_cache blocks=128 'ks=[32,64]'

The settings are Hydra overrides of ``conf/bench/teacher_cache.yaml``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from bench import ROOT
from distill.config import exit_on_config_error

CROSSOVER = "E* = B / (L - R): B the cache's build over one epoch, L the live teacher over one epoch, R the lookups"


def run(cfg: DictConfig) -> dict[int, dict[str, Any]]:
    """Build a cache per k and print one line per k plus the ratios (and the crossover); returns them by k."""
    ks = list(cfg.ks) if isinstance(cfg.ks, ListConfig) else [cfg.ks]  # ks=64 means one k
    from distill.data.datamodule import DistillDataModule
    from distill.models.cache_builder import build_cache

    teacher = hydra.utils.instantiate(cfg.teacher)
    dm = DistillDataModule(teacher.tokenizer, block_size=cfg.block)
    dm.setup()
    rows: dict[int, dict[str, Any]] = {}
    live = teacher_seconds(teacher, dm, cfg) if cfg.crossover else None
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in ks):
            folder = Path(tmp) / f"k{k}"
            m = build_cache(teacher, dm, folder, top_k=k, max_blocks=cfg.blocks, splits=("train",), progress=False)
            rows[k] = {key: m[key] for key in ("bytes_per_token", "reconstruction_kl", "mean_topk_mass", "seconds")}
            print(
                f"k={k:4d}  bytes/token {m['bytes_per_token']:7.1f} (payload {m['bytes_per_token_payload']})  "
                f"reconstruction KL {m['reconstruction_kl']:.4f} nats/token  top-k mass {m['mean_topk_mass']:.4f}  "
                f"tokens {m['tokens']}  build {m['seconds']:.1f} s"
            )
            if live is not None:
                lookup = teacher_seconds(_cached(folder), dm, cfg, temperature=cfg.temperature)
                rows[k]["crossover"] = crossover(m["seconds"], live, lookup, m["splits"]["train"]["blocks"], dm)
    full_bytes = teacher.vocab_size * 4  # one float32 distribution per token, for scale
    for k, m in rows.items():
        print(f"ratio bytes_per_token k={k} / full fp32 distribution = {m['bytes_per_token'] / full_bytes:.5f}")
    if live is not None:
        _print_crossover(rows, len(dm.train_set))
    if cfg.get("json"):
        write_results(Path(cfg.json), rows, cfg, len(dm.train_set), full_bytes, live)
    return rows


def write_results(
    out: Path, rows: dict[int, dict[str, Any]], cfg: DictConfig, epoch_blocks: int, full_bytes: int, live: float | None
) -> None:
    """Write the rows to ``out`` (JSON) and a table beside it (``.md``, which docs/performance.md includes)."""
    from bench.step_time import machine as machine_facts

    machine = {**machine_facts(), "load_average_end": os.getloadavg()}
    result = {
        "machine": machine,
        "blocks": cfg.blocks,
        "block": cfg.block,
        "epoch_blocks": epoch_blocks,
        "live_seconds": live,
        "full_fp32_bytes_per_token": full_bytes,
        "formula": CROSSOVER,
        "ks": {str(k): v for k, v in rows.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    lines = [
        "# Teacher cache",
        "",
        f"`python -m bench.teacher_cache` on {machine['cpus']} CPUs ({machine['processor']}, {machine['threads']} "
        f"threads, torch {machine['torch']}), {machine['date']}; {cfg.blocks} training blocks of {cfg.block} tokens "
        f"timed, scaled to the training split's {epoch_blocks} blocks. {CROSSOVER}.",
        "",
        "| k | bytes/token | of a full fp32 distribution | reconstruction KL (nats/token) | top-k mass "
        "| B build s/epoch "
        "| L live s/epoch | R lookup s/epoch | crossover E* (epochs) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, m in rows.items():
        c = m.get("crossover")
        timing = (
            f"{c['build_per_epoch_s']:.0f} | {c['live_per_epoch_s']:.0f} | {c['lookup_per_epoch_s']:.0f} | "
            f"{c['epochs']:.2f}"
            if c
            else "– | – | – | –"
        )
        lines.append(
            f"| {k} | {m['bytes_per_token']:.1f} | {m['bytes_per_token'] / full_bytes:.5f} | "
            f"{m['reconstruction_kl']:.4f} | {m['mean_topk_mass']:.4f} | {timing} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md').name}")


def _cached(folder: Path) -> Any:
    from distill.models.teacher_cache import CachedTeacher

    return CachedTeacher(str(folder))


def teacher_seconds(teacher: Any, dm: Any, cfg: DictConfig, temperature: float | None = None) -> float:
    """Median seconds of one pass over the first ``blocks`` training blocks, ``batch`` at a time, as the loss reads it.

    Live: the body's forward, then the output layer over the rows in chunks of ``chunk``. Cached (``temperature``):
    the lookup of the top-k and tail buckets at that temperature, handed out in the same chunks.
    """
    import torch

    from distill.data.datamodule import DistillDataModule

    n = min(cfg.blocks, len(dm.train_set))
    batches = [
        DistillDataModule.collate([dm.train_set[i] for i in range(s, min(s + cfg.batch, n))])["input_ids"]
        for s in range(0, n, cfg.batch)
    ]
    extra = {"temperature": temperature} if temperature is not None else {}

    def one_pass() -> None:
        with torch.no_grad():
            for ids in batches:
                rows, _ = teacher.rows(ids, vocab=teacher.vocab_size, **extra)
                total = ids.shape[0] * (ids.shape[1] - 1)
                for s in range(0, total, cfg.chunk):
                    rows(s, min(s + cfg.chunk, total))

    one_pass()  # warm-up (and the cache's first reads from disk)
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def crossover(build: float, live: float, lookup: float, blocks: int, dm: Any) -> dict[str, float]:
    """The epochs from which a cache built once beats the live teacher (:data:`CROSSOVER`), from per-pass seconds.

    Args:
        build: seconds to build the cache over ``blocks`` training blocks.
        live: seconds of the live teacher over those blocks; lookup: of the cache's lookups over them.
        blocks: blocks measured; the epoch is the datamodule's whole training split.
        dm: the datamodule (its ``train_set`` is one epoch).

    """
    scale = len(dm.train_set) / blocks
    b, live_epoch, lookup_epoch = build * scale, live * scale, lookup * scale
    saved = live_epoch - lookup_epoch
    return {
        "build_per_epoch_s": b,
        "live_per_epoch_s": live_epoch,
        "lookup_per_epoch_s": lookup_epoch,
        "epochs": b / saved if saved > 0 else float("inf"),
    }


def _print_crossover(rows: dict[int, dict[str, Any]], epoch_blocks: int) -> None:
    print(f"crossover, {CROSSOVER}; one epoch = {epoch_blocks} training blocks")
    for k, m in rows.items():
        c = m["crossover"]
        print(
            f"k={k:4d}  B {c['build_per_epoch_s']:8.1f} s  L {c['live_per_epoch_s']:8.1f} s  "
            f"R {c['lookup_per_epoch_s']:7.1f} s  crossover {c['epochs']:.2f} epochs"
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/teacher_cache")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
