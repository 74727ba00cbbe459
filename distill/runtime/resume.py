"""Choosing the checkpoint to resume from: ``resume: auto | <path> | null``."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from distill.config import config_error

log = logging.getLogger("distill")


def is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint: a ``.ckpt`` file, or the folder DeepSpeed writes under that name (with ``latest``)."""
    return path.is_file() or (path.is_dir() and (path / "latest").is_file())


def is_whole(path: Path) -> bool:
    """Whether a checkpoint was written to the end: a ``.ckpt`` file is a zip whose closing record is there.

    Lightning writes a checkpoint to a temporary file and moves it into place; where the temporary folder
    (``$TMPDIR``) is on another file system, the move is a copy, and a job killed during it (or a full disk)
    leaves a truncated file under the final name. Reading the zip's end record costs one seek, not a load.
    """
    return path.is_dir() or zipfile.is_zipfile(path)


def resolve_resume(resume: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint path to hand to ``trainer.fit(ckpt_path=...)``, or None to start fresh.

    ``auto`` picks the newest ``*.ckpt`` in ``checkpoint_dir`` (by modification time, so ``last.ckpt``
    wins when it is the latest save) that was written whole (:func:`is_whole`), and starts fresh when there
    is none; it removes checkpoints that were cut short. Any other string must be an existing checkpoint.
    Under DeepSpeed each checkpoint is a folder named like the file (:func:`is_checkpoint`).
    """
    if resume in (None, "", False, "null", "none"):
        return None
    if resume == "auto":
        found = [p for p in Path(checkpoint_dir).glob("*.ckpt") if is_checkpoint(p)]
        whole = [p for p in found if is_whole(p)]
        for path in sorted(set(found) - set(whole)):
            # A dead writer's remains (the run lock keeps live ones out). Removed, not kept: Lightning would
            # otherwise save this step as step...-v1.ckpt beside it, and the broken file would stay for good.
            log.warning("resume=auto: removing %s, a checkpoint cut short while it was written", path)
            path.unlink(missing_ok=True)
        return str(max(whole, key=lambda p: p.stat().st_mtime)) if whole else None
    path = Path(str(resume)).expanduser()
    if not is_checkpoint(path):
        raise config_error(
            "resume",
            str(resume),
            "no such checkpoint; give an existing .ckpt file (or DeepSpeed's .ckpt folder), 'auto' or null",
        )
    return str(path)
