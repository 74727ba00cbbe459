"""Build the offline teacher cache: ``python -m distill.models.cache_builder [teacher=...] [data=...] [cache.top_k=64]``.

See :mod:`distill.models.teacher_cache` for the format and how the tail mass is handled.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import save_file
from tqdm import tqdm

from distill.config import ConfigError, build, config_error, exit_on_config_error
from distill.data.datamodule import DistillDataModule
from distill.models.teacher import FrozenTeacher
from distill.models.teacher_cache import FORMAT_VERSION, MANIFEST, bytes_per_token, describe, index_dtype
from distill.models.tokenizer import tokenizer_fingerprint
from distill.runtime.paths import export_root

log = logging.getLogger("distill")


def _identity(teacher: FrozenTeacher, datamodule: DistillDataModule, top_k: int) -> dict[str, Any]:
    config = teacher.config.to_dict()
    keep = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {
        "version": FORMAT_VERSION,
        "teacher": teacher.name,
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
        "data_key": datamodule.cache_path.name,
        "block_size": datamodule.block_size,
        "vocab_size": teacher.vocab_size,
        "top_k": top_k,
        "teacher_config": keep,
    }


@torch.no_grad()
def build_cache(
    teacher: FrozenTeacher,
    datamodule: DistillDataModule,
    out_dir: str | Path,
    top_k: int = 64,
    blocks_per_shard: int = 256,
    batch_size: int = 8,
    splits: tuple[str, ...] = ("train", "val"),
    max_blocks: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the teacher over the packed splits and write the cache; resumes shard by shard.

    Args:
        teacher: the live teacher.
        datamodule: the data, already set up (its tokenised, packed splits).
        out_dir: the cache folder.
        top_k: log-probabilities kept per token.
        blocks_per_shard: packed blocks per safetensors file.
        batch_size: blocks per teacher forward pass.
        splits: which splits to cache.
        max_blocks: cap on blocks per split (for quick caches and benchmarks).
        progress: show a progress bar.

    Returns:
        The manifest.

    """
    if not 1 <= top_k <= teacher.vocab_size:
        raise config_error("cache.top_k", top_k, f"must lie in 1..{teacher.vocab_size} (the vocabulary)")
    if blocks_per_shard < 1:
        raise config_error("cache.blocks_per_shard", blocks_per_shard, "must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(teacher, datamodule, top_k)
    manifest_file = out / MANIFEST
    if manifest_file.is_file():
        old = json.loads(manifest_file.read_text())
        diff = [
            k
            for k in ("teacher", "tokenizer", "data_key", "block_size", "top_k", "version")
            if old.get(k) != identity[k]
        ]
        if diff:
            raise ConfigError(
                f"cache.dir={str(out)!r}: holds a cache for another {', '.join(diff)} "
                f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another cache.dir or delete it"
            )
    manifest = {**identity, "complete": False, "splits": {}}
    manifest_file.write_text(json.dumps(manifest, indent=1))
    teacher.tokenizer.save_pretrained(out / "tokenizer")

    vocab, idx_dtype = teacher.vocab_size, index_dtype(teacher.vocab_size)
    device = next(teacher.parameters()).device
    kl_sum, mass_sum, tokens, started = 0.0, 0.0, 0, time.perf_counter()
    for split in splits:
        data = datamodule.train_set if split == "train" else datamodule.val_set
        n = len(data) if max_blocks is None else min(len(data), max_blocks)
        shards = []
        for shard_no, first in enumerate(range(0, n, blocks_per_shard)):
            name = f"{split}-{shard_no:05d}.safetensors"
            shards.append(name)
            stats_file = out / f"{name}.json"
            if (out / name).is_file() and stats_file.is_file():  # done in an earlier, interrupted build
                stats = json.loads(stats_file.read_text())
            else:
                ids_all, vals, idxs, stats = [], [], [], {"kl_sum": 0.0, "mass_sum": 0.0, "tokens": 0}
                last = min(first + blocks_per_shard, n)
                bar = tqdm(range(first, last, batch_size), desc=f"teacher {name}", disable=not progress)
                for start in bar:
                    ids = data[start : min(start + batch_size, last)]["input_ids"].to(device)
                    logp = F.log_softmax(teacher(ids).logits[..., :vocab].float(), dim=-1)
                    values, indices = logp.topk(top_k, dim=-1)
                    tail = (1.0 - values.exp().sum(-1)).clamp_min(1e-12)
                    # KL(p‖q) = Σ_tail p·(log p − log q_tail): the top-k terms vanish by construction.
                    q_tail = (tail / max(vocab - top_k, 1)).log()
                    kl = (logp.exp() * (logp - q_tail.unsqueeze(-1))).sum(-1) - (
                        values.exp() * (values - q_tail.unsqueeze(-1))
                    ).sum(-1)
                    stats["kl_sum"] += float(kl.sum())
                    stats["mass_sum"] += float((1.0 - tail).sum())
                    stats["tokens"] += ids.numel()
                    ids_all.append(ids.cpu().to(idx_dtype))
                    vals.append(values.cpu().half())
                    idxs.append(indices.cpu().to(idx_dtype))
                tensors = {
                    "input_ids": torch.cat(ids_all),
                    "topk_logprobs": torch.cat(vals),
                    "topk_indices": torch.cat(idxs),
                }
                tmp = out / f".{name}.tmp"
                save_file(tensors, str(tmp), metadata={"split": split, "first_block": str(first)})
                os.replace(tmp, out / name)  # atomic: a shard file is either whole or absent
                stats_file.write_text(json.dumps(stats))
            kl_sum += stats["kl_sum"]
            mass_sum += stats["mass_sum"]
            tokens += stats["tokens"]
        manifest["splits"][split] = {"blocks": n, "shards": shards}
    files = [out / s for split in manifest["splits"].values() for s in split["shards"]]
    manifest.update(
        {
            "complete": True,
            "tokens": tokens,
            "bytes": sum(f.stat().st_size for f in files),
            "bytes_per_token": sum(f.stat().st_size for f in files) / max(tokens, 1),
            "bytes_per_token_payload": bytes_per_token(top_k, vocab),
            "reconstruction_kl": kl_sum / max(tokens, 1),
            "mean_topk_mass": mass_sum / max(tokens, 1),
            "tail": "uniform over the V-k tokens outside the top k",
            "seconds": time.perf_counter() - started,
        }
    )
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="cache_teacher")
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
        )
    print(f"teacher cache at {cfg.cache.dir}: {describe(manifest)}")


if __name__ == "__main__":
    export_root()
    main()
