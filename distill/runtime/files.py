"""Publishing folders atomically: exports, the tokenised data cache and the tiny test tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out_dir: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty folder next to ``out_dir``; publish it as ``out_dir`` only if the block succeeds.

    A failure removes the half-written folder, so readers never see a partial folder where a good one was.

    Args:
        out_dir: the folder to publish.
        replace: what to do when ``out_dir`` exists once the block is done. True (exports): replace it with
            the new folder, swapping only once the new one is complete. False (caches that several processes
            may build at once, with the same content): keep the existing folder and discard the new one.

    Yields:
        The temporary folder to write into, on the same file system as ``out_dir``.

    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        yield tmp
        if not replace:
            _publish_unless_present(tmp, out_dir)
        elif out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_unless_present(tmp: Path, out_dir: Path) -> None:
    # Another process may publish between the check and the rename; renaming onto its non-empty folder
    # then fails, and its folder (built from the same inputs) is as good as ours.
    if not out_dir.exists():
        try:
            tmp.rename(out_dir)
            return
        except OSError:
            if not out_dir.exists():
                raise
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
