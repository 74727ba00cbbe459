"""Publishing files and folders atomically: exports, caches, reports and the run lock.

Every writer assembles its output under a temporary name of its own, next to the target (so the final
rename stays on one file system and is atomic), and publishes it only once it is complete. The temporary
name carries the writer's host and pid, ``.<name>.<host>-<pid>-<random>.tmp``: two writers of one target
never share a temporary file, and what a killed writer left behind is recognised and removed later
(:func:`clean_leftovers`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# A leftover of a writer on another host is removed once it is this old: that host's processes cannot be
# asked whether they are alive, and no export or shard takes a day to write.
FOREIGN_LEFTOVER_S = 24 * 3600.0
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|old)$")
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
_AT_FDCWD = -100
_TRIES = 10  # publishing retries while other writers of the same folder publish at the same moment


def host_name() -> str:
    """The short name of this host, as written in temporary names and the run lock (no dots: they split fields)."""
    return socket.gethostname().split(".")[0] or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    try:  # Linux: the state field after the command name; elsewhere the signal check is all there is
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def temp_path(path: str | Path, kind: str = "tmp") -> Path:
    """A name next to ``path`` that only this writer uses: ``.<name>.<host>-<pid>-<random>.<kind>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_name()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def clean_leftovers(folder: str | Path, now: float | None = None) -> list[Path]:
    """Remove the temporary files and folders of dead writers from ``folder``; returns what was removed.

    A leftover of this host is removed when its writer's pid is no longer running; one of another host
    (a shared file system) once it is :data:`FOREIGN_LEFTOVER_S` old. Live writers' files are kept.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        if match["host"] == host_name():
            if pid_alive(int(match["pid"])):
                continue
        else:
            with suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime < FOREIGN_LEFTOVER_S:
                    continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; it replaces ``path`` only if the block succeeds.

    Readers see the old file or the new one, whole; a failed block removes its temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file, whole."""
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename publishes it, so a power cut leaves no empty file


@contextmanager
def atomic_directory(out_dir: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty folder next to ``out_dir``; publish it as ``out_dir`` only if the block succeeds.

    A failure removes the half-written folder, so readers never see a partial folder where a good one was.

    Args:
        out_dir: the folder to publish.
        replace: what to do when ``out_dir`` exists once the block is done. True (exports): replace it with
            the new folder in one step (:func:`_swap_in`), so a reader finds the old folder or the new one,
            never none. False (caches that several processes may build at once, with the same content):
            keep the existing folder and discard the new one.

    Yields:
        The temporary folder to write into, on the same file system as ``out_dir``.

    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir.parent)
    tmp = temp_path(out_dir)
    tmp.mkdir()  # with the umask's permissions, as any other output (mkdtemp's 0700 hid exports from the group)
    try:
        yield tmp
        if replace:
            replaced = _swap_in(tmp, out_dir)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
        else:
            _publish_unless_present(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out_dir: Path) -> Path | None:
    """Publish the folder ``tmp`` as ``out_dir``; returns where the folder it replaced now is (None: none was).

    Linux swaps the two folders in one ``renameat2(RENAME_EXCHANGE)``. A file system without it (NFS, other
    systems) gets two renames, the old folder aside and the new one in, with a moment between them where
    ``out_dir`` is missing. Writers that publish at the same moment retry: the last one's folder stays.
    """
    for _ in range(_TRIES):
        if not os.path.lexists(out_dir):
            try:
                tmp.rename(out_dir)
                return None
            except OSError as err:  # another writer published first: swap with its folder instead
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                continue
        try:
            if _exchange(tmp, out_dir):
                return tmp
            aside = temp_path(out_dir, "old")
            out_dir.rename(aside)
            try:
                tmp.rename(out_dir)
            except OSError:
                shutil.rmtree(aside, ignore_errors=True)  # another writer's folder took the place: it is whole
                raise
            return aside
        except FileNotFoundError:  # another writer moved it aside in between: try again
            continue
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EBUSY, f"{out_dir}: other processes kept replacing it; {tmp} was not published")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> Any:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc/Linux
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


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
