"""Choosing the checkpoint to resume from: ``resume: auto | <path> | null``."""

from __future__ import annotations

from pathlib import Path

from distill.config import config_error


def is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint: a ``.ckpt`` file, or the folder DeepSpeed writes under that name (with ``latest``)."""
    return path.is_file() or (path.is_dir() and (path / "latest").is_file())


def resolve_resume(resume: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint path to hand to ``trainer.fit(ckpt_path=...)``, or None to start fresh.

    ``auto`` picks the newest ``*.ckpt`` in ``checkpoint_dir`` (by modification time, so ``last.ckpt``
    wins when it is the latest save) and starts fresh when there is none. Any other string must be an
    existing checkpoint. Under DeepSpeed each checkpoint is a folder named like the file (:func:`is_checkpoint`).
    """
    if resume in (None, "", False, "null", "none"):
        return None
    if resume == "auto":
        found = [p for p in Path(checkpoint_dir).glob("*.ckpt") if is_checkpoint(p)]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = Path(str(resume)).expanduser()
    if not is_checkpoint(path):
        raise config_error(
            "resume",
            str(resume),
            "no such checkpoint; give an existing .ckpt file (or DeepSpeed's .ckpt folder), 'auto' or null",
        )
    return str(path)
