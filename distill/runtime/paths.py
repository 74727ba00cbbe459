"""The launch directory for ``conf/paths`` (``paths.root_dir``), set before Hydra composes anything."""

from __future__ import annotations

import os


def export_root() -> None:
    """Export ``DISTILL_ROOT`` = the current directory unless the caller already chose one.

    ``conf/paths/default.yaml`` reads it, because ``${hydra:runtime.cwd}`` cannot be resolved where Hydra's
    sweeper builds ``hydra.sweep.dir`` (``python train.py -m ...`` would fail before its first job).
    """
    os.environ.setdefault("DISTILL_ROOT", os.getcwd())
