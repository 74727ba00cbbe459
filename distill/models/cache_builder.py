"""Build the offline teacher cache: ``python -m distill.models.cache_builder [teacher=...] [cache.top_k=64]``.

The settings are Hydra overrides of ``conf/cache_teacher.yaml`` (``data=...`` and ``teacher=...`` pick the pair).

See :mod:`distill.models.teacher_cache` for the format and how the tail mass is handled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from distill.config import ConfigError, build, config_error, exit_on_config_error
from distill.data.datamodule import DistillDataModule
from distill.fingerprint import tokenizer_fingerprint, weights_hash
from distill.models.teacher import FrozenTeacher
from distill.models.teacher_cache import (
    DEFAULT_TEMPERATURES,
    FORMAT_VERSION,
    MANIFEST,
    bytes_per_token,
    describe,
    index_dtype,
)
from distill.runtime.files import atomic_file, atomic_write_text
from distill.runtime.paths import export_root

log = logging.getLogger("distill")


def _identity(
    teacher: FrozenTeacher, datamodule: DistillDataModule, top_k: int, temperatures: tuple[float, ...]
) -> dict[str, Any]:
    config = teacher.config.to_dict()
    keep = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {
        "version": FORMAT_VERSION,
        "teacher": teacher.name,
        "weights": weights_hash(teacher.model),
        "temperatures": list(temperatures),
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
        "data_key": datamodule.data_key(),
        "block_size": datamodule.block_size,
        "vocab_size": teacher.vocab_size,
        "top_k": top_k,
        "teacher_config": keep,
    }


def _check_settings(
    top_k: int, vocab: int, blocks_per_shard: int, temperatures: tuple[float, ...]
) -> tuple[float, ...]:
    """Refuse settings no cache can be built with; returns the temperatures as floats."""
    if not 1 <= top_k < vocab:
        raise config_error("cache.top_k", top_k, f"must lie in 1..{vocab - 1} (fewer than the vocabulary's ids)")
    temperatures = tuple(float(t) for t in temperatures)
    if not temperatures or any(t <= 0 for t in temperatures):
        raise config_error("cache.temperatures", list(temperatures), "give one or more temperatures > 0")
    if blocks_per_shard < 1:
        raise config_error("cache.blocks_per_shard", blocks_per_shard, "must be at least 1")
    return temperatures


def _split_blocks(datamodule: DistillDataModule, split: str) -> Any:
    """The packed blocks of ``split`` exactly as the run's loaders hand them out (held-out: last block padded)."""
    blocks = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}
    if split not in blocks:
        raise config_error("cache.splits", split, f"name splits among {', '.join(blocks)}")
    return blocks[split]


def _recorded_source(source: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The teacher's config node as the manifest keeps it: plain values, a local ``path`` made absolute.

    ``student=from_teacher`` with ``teacher=cached`` loads the teacher again from this record, possibly from
    another working directory, so a relative folder is resolved now; a hub id is kept as given.
    """
    if source is None:
        return None
    record = dict(OmegaConf.to_container(source, resolve=True) if isinstance(source, DictConfig) else source)
    if "_target_" not in record:
        raise config_error("teacher._target_", None, "the teacher's config node must name what builds it")
    path = record.get("path")
    if isinstance(path, str) and Path(path).exists():
        record["path"] = str(Path(path).resolve())
    return record


@torch.no_grad()
def build_cache(
    teacher: FrozenTeacher,
    datamodule: DistillDataModule,
    out_dir: str | Path,
    top_k: int = 64,
    blocks_per_shard: int = 256,
    batch_size: int = 8,
    splits: tuple[str, ...] = ("train", "val", "test"),
    max_blocks: int | None = None,
    progress: bool = True,
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the teacher over the packed splits and write the cache; resumes shard by shard.

    Args:
        teacher: the live teacher.
        datamodule: the data, already set up (its tokenised, packed splits).
        out_dir: the cache folder.
        top_k: log-probabilities kept per token.
        blocks_per_shard: packed blocks per safetensors file.
        batch_size: blocks per teacher forward pass.
        splits: which splits to cache: ``train`` and ``val`` are read while training, ``test`` by the end-of-run
            report. Held-out blocks are stored as the datamodule packs them, the last one's padded tail included.
        max_blocks: cap on blocks per split (quick caches; a capped ``test`` split cannot serve the report).
        progress: show a progress bar.
        temperatures: the KD temperatures training may use with this cache; each costs 8 bytes per token
            (its shift and tail mass).
        source: the teacher's config node (``_target_`` and its arguments) the live teacher was built from.
            Recorded in the manifest, so ``student=from_teacher`` can load the teacher again to copy its layers;
            without it a cache trains only students that need no teacher weights.

    Returns:
        The manifest.

    """
    temperatures = _check_settings(top_k, teacher.vocab_size, blocks_per_shard, temperatures)
    blocks_of = {split: _split_blocks(datamodule, split) for split in splits}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = {"splits": sorted(splits), "max_blocks": max_blocks, "blocks_per_shard": blocks_per_shard}
    identity = {**_identity(teacher, datamodule, top_k, temperatures), "teacher_source": _recorded_source(source)}
    manifest = _start_manifest(out, identity, layout)
    teacher.tokenizer.save_pretrained(out / "tokenizer")

    totals, started = {"kl_sum": 0.0, "mass_sum": 0.0, "tokens": 0}, time.perf_counter()
    for split, data in blocks_of.items():
        n = len(data) if max_blocks is None else min(len(data), max_blocks)
        shards = []
        for shard_no, first in enumerate(range(0, n, blocks_per_shard)):
            shards.append(f"{split}-{shard_no:05d}.safetensors")
            blocks = range(first, min(first + blocks_per_shard, n))
            stats = _write_shard(
                teacher, data, out / shards[-1], split, blocks, (top_k, temperatures), batch_size, progress
            )
            totals = {key: totals[key] + stats[key] for key in totals}
        manifest["splits"][split] = {"blocks": n, "shards": shards}
    payload = bytes_per_token(top_k, teacher.vocab_size, len(temperatures))
    _finish_manifest(manifest, out, totals, payload, started)
    return manifest


def _finish_manifest(
    manifest: dict[str, Any], out: Path, totals: dict[str, Any], payload: float, started: float
) -> None:
    """Mark the cache complete, with its size and how well the top-k reconstructs the teacher."""
    files = [out / s for split in manifest["splits"].values() for s in split["shards"]]
    tokens = totals["tokens"]
    manifest.update(
        {
            "complete": True,
            "tokens": tokens,
            "bytes": sum(f.stat().st_size for f in files),
            "bytes_per_token": sum(f.stat().st_size for f in files) / max(tokens, 1),
            "bytes_per_token_payload": payload,
            "reconstruction_kl": totals["kl_sum"] / max(tokens, 1),
            "mean_topk_mass": totals["mass_sum"] / max(tokens, 1),
            "tail": "training: one lumped bucket per temperature; evaluation: uniform over the V-k other tokens",
            "seconds": time.perf_counter() - started,
        }
    )
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _start_manifest(out: Path, identity: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    """Write an incomplete manifest; a folder holding another teacher's or data's cache is refused.

    ``layout`` (splits, max_blocks, blocks_per_shard) decides which blocks each shard holds. A build resumed on
    shards written with another layout would keep them and mark the cache complete with gaps (or drop the splits
    it was not asked for), so it is refused, naming the setting to give back. Adding splits is allowed: a cache
    built for train and val gains the test split without recomputing the others. A build that records no
    ``teacher_source`` keeps the one recorded before (the weights hash has shown it is the same teacher).
    """
    manifest_file = out / MANIFEST
    if manifest_file.is_file():
        old = json.loads(manifest_file.read_text())
        diff = [
            k
            for k in ("teacher", "weights", "tokenizer", "data_key", "block_size", "top_k", "temperatures", "version")
            if old.get(k) != identity[k]
        ]
        if diff:
            raise ConfigError(
                f"cache.dir={str(out)!r}: holds a cache for another {', '.join(diff)} "
                f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another cache.dir or delete it"
            )
        _check_layout(out, old, layout)
        if identity.get("teacher_source") is None:
            identity = {**identity, "teacher_source": old.get("teacher_source")}
    manifest = {**identity, "layout": layout, "complete": False, "splits": {}}
    atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
    return manifest


def _check_layout(out: Path, old: dict[str, Any], layout: dict[str, Any]) -> None:
    """Refuse a build over shards written with fewer splits, other max_blocks or blocks_per_shard (see above)."""
    before = old.get("layout")
    if before is None:  # written before the layout was recorded: each kept shard's blocks are checked instead
        return

    def differs(key: str) -> bool:
        if key == "splits":  # more splits keep every shard written so far
            return not set(before.get(key) or []) <= set(layout[key])
        return before.get(key) != layout[key]

    key = next((k for k in layout if differs(k)), None)
    if key is None:
        return
    state = "complete cache in {} was built" if old.get("complete") else "partial build in {} was started"
    now, then = (json.dumps(v) for v in (layout[key], before.get(key)))  # as Hydra reads them back: null, ["train"]
    raise ConfigError(
        f"cache.{key}={now}: the {state.format(out)} with {then}; rerun with cache.{key}={then}, "
        f"or remove {out} to build it with the new setting"
    )


def _write_shard(
    teacher: FrozenTeacher,
    data: Any,
    path: Path,
    split: str,
    blocks: range,
    targets: tuple[int, tuple[float, ...]],
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Score ``blocks`` and write them as the shard ``path`` with its stats; a shard already done is kept.

    ``targets`` is (k, temperatures): the top k at τ = 1 and, per temperature, the shift and tail mass.

    Returns:
        The shard's ``kl_sum``, ``mass_sum`` and ``tokens``.

    """
    stats_file = path.with_name(f"{path.name}.json")
    if path.is_file() and stats_file.is_file():  # done in an earlier, interrupted build
        _check_kept_shard(path, blocks)
        return json.loads(stats_file.read_text())
    vocab, idx_dtype = teacher.vocab_size, index_dtype(teacher.vocab_size)
    device = next(teacher.parameters()).device
    top_k, temperatures = targets
    ids_all, vals, idxs, shifts, tails = [], [], [], [], []
    stats = {"kl_sum": 0.0, "mass_sum": 0.0, "tokens": 0}
    last = blocks.stop
    bar = tqdm(range(blocks.start, last, batch_size), desc=f"teacher {path.name}", disable=not progress)
    for start in bar:
        rows = data[start : min(start + batch_size, last)]
        ids = rows["input_ids"].to(device)
        logp = F.log_softmax(teacher(ids).logits[..., :vocab].float(), dim=-1)
        values, indices = logp.topk(top_k, dim=-1)
        for key, value in _reconstruction_stats(logp, values, _real(rows, ids)).items():
            stats[key] += value
        shift, tail_mass = tempered_statistics(logp, indices, temperatures)
        shifts.append(shift.cpu())
        tails.append(tail_mass.cpu())
        ids_all.append(ids.cpu().to(idx_dtype))
        vals.append(values.cpu().half())
        idxs.append(indices.cpu().to(idx_dtype))
    tensors = {
        "input_ids": torch.cat(ids_all),
        "topk_logprobs": torch.cat(vals),
        "topk_indices": torch.cat(idxs),
        "shift": torch.cat(shifts),
        "tail_logmass": torch.cat(tails),
    }
    with atomic_file(path) as tmp:  # a temporary name of this writer's own: a shard file is whole or absent
        save_file(tensors, str(tmp), metadata={"split": split, "first_block": str(blocks.start)})
    atomic_write_text(stats_file, json.dumps(stats))
    return stats


def _real(rows: dict[str, Tensor], ids: Tensor) -> Tensor:
    """Which positions hold text: all of a training block, a held-out block's first ``length`` (the rest pad it)."""
    if "length" not in rows:
        return torch.ones_like(ids, dtype=torch.bool)
    return torch.arange(ids.shape[1], device=ids.device) < rows["length"].to(ids.device).unsqueeze(1)


def _reconstruction_stats(logp: Tensor, values: Tensor, real: Tensor) -> dict[str, float]:
    """Summed KL(teacher ‖ top-k reconstruction), top-k mass and token count over the ``real`` positions.

    A held-out block's padded tail is stored (lookups hash the whole block) but is no text, so the manifest's
    per-token statistics leave it out.
    """
    vocab, top_k = logp.shape[-1], values.shape[-1]
    tail = (1.0 - values.exp().sum(-1)).clamp_min(1e-12)
    # KL(p‖q) = Σ_tail p·(log p − log q_tail): the top-k terms vanish by construction.
    q_tail = (tail / max(vocab - top_k, 1)).log()
    kl = (logp.exp() * (logp - q_tail.unsqueeze(-1))).sum(-1) - (values.exp() * (values - q_tail.unsqueeze(-1))).sum(-1)
    return {"kl_sum": float(kl[real].sum()), "mass_sum": float((1.0 - tail)[real].sum()), "tokens": int(real.sum())}


def _check_kept_shard(path: Path, blocks: range) -> None:
    """Refuse to keep a shard that holds other blocks than this build puts there (written with another layout)."""
    with safe_open(str(path), framework="pt") as handle:
        first = int((handle.metadata() or {}).get("first_block", -1))
        rows = handle.get_slice("input_ids").get_shape()[0]
    if (first, rows) != (blocks.start, len(blocks)):
        raise ConfigError(
            f"cache.dir={str(path.parent)!r}: {path.name} holds blocks {first}..{first + rows - 1}, but this build "
            f"puts {blocks.start}..{blocks.stop - 1} there (it was written with another cache.max_blocks or "
            f"cache.blocks_per_shard); rerun with the settings of the build that wrote it, or remove {path.parent}"
        )


def tempered_statistics(logp: Tensor, indices: Tensor, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Per position and temperature τ: ``shift_τ`` and the log of the mass outside the top k at τ.

    With the full log-probabilities ``logp`` at τ = 1, the tempered ones are ``logp / τ + shift_τ`` where
    ``shift_τ = -logsumexp(logp / τ)``; the tail mass is summed over every id outside ``indices``.

    Returns:
        ``shift`` and ``tail_logmass``, each ``(..., len(temperatures))`` in float32.

    """
    shifts, tails = [], []
    outside = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, indices, True).logical_not_()
    for tau in temperatures:
        scaled = logp / tau
        shift = -scaled.logsumexp(-1)
        shifts.append(shift)
        tails.append((scaled.masked_fill(~outside, float("-inf"))).logsumexp(-1) + shift)
    return torch.stack(shifts, -1).float(), torch.stack(tails, -1).float()


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="cache_teacher")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: build the cache described by ``conf/cache_teacher.yaml``."""
    with exit_on_config_error():
        teacher = build(cfg.teacher)
        datamodule = build(cfg.data, tokenizer=teacher.tokenizer)
        datamodule.setup()
        manifest = build_cache(
            teacher,
            datamodule,
            cfg.cache.dir,
            top_k=cfg.cache.top_k,
            blocks_per_shard=cfg.cache.blocks_per_shard,
            batch_size=cfg.cache.batch_size,
            splits=tuple(cfg.cache.splits),
            max_blocks=cfg.cache.max_blocks,
            temperatures=tuple(cfg.cache.temperatures),
            source=cfg.teacher,  # recorded: student=from_teacher loads the teacher again from it
        )
    print(f"teacher cache at {cfg.cache.dir}: {describe(manifest)}")


if __name__ == "__main__":
    export_root()
    main()
