"""The benchmarks: each module is a Hydra entry point run from the repository root as ``python -m bench.<name>``.

Running them as modules of this package (not as files) puts the repository root on ``sys.path`` without any
script editing it, so ``bench.*``, ``train`` and the installed ``distill`` resolve the same way in every script.
"""

import os
from pathlib import Path

# Set before any script imports `tokenizers`: a tokenizer used in this process and then in forked dataloader
# workers warns (and turns its own threads off) unless told which it should be.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The checkout the benchmarks run from: its conf/, train.py, logs/ and bench/results/.
ROOT = Path(__file__).resolve().parents[1]
