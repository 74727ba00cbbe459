"""Atomic publishing: exports replace a finished folder in one step, caches keep the one another process published,
and two writers of one target never share a temporary name."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distill.runtime import files
from distill.runtime.files import atomic_directory, atomic_file, atomic_write_text


def test_atomic_directory_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    out = tmp_path / "student"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folder left behind


def test_atomic_directory_replaces_a_finished_folder_whole(tmp_path):
    out = tmp_path / "student"
    with atomic_directory(out) as tmp:
        (tmp / "old_only").write_text("1")
    with atomic_directory(out) as tmp:
        (tmp / "new_only").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new_only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_without_replace_a_missing_folder_is_published(tmp_path):
    out = tmp_path / "cache" / "key"
    with atomic_directory(out, replace=False) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "done").write_text("mine")
    assert (out / "done").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["key"]


def test_without_replace_a_folder_published_during_the_block_wins(tmp_path):
    out = tmp_path / "key"
    with atomic_directory(out, replace=False) as tmp:
        (tmp / "done").write_text("mine")
        out.mkdir()  # another process finished the same cache first
        (out / "done").write_text("theirs")
    assert (out / "done").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # ours was discarded, not left behind


def test_without_replace_losing_the_race_at_the_rename_keeps_the_winner(tmp_path, monkeypatch):
    out = tmp_path / "key"
    rename = Path.rename

    def publish_first(self: Path, target: Path) -> Path:
        # The other process publishes between our existence check and our rename.
        if Path(target) == out and not out.exists():
            out.mkdir()
            (out / "done").write_text("theirs")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", publish_first)
    with atomic_directory(out, replace=False) as tmp:
        (tmp / "done").write_text("mine")
    assert (out / "done").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_without_replace_a_failure_publishes_nothing_and_cleans_up(tmp_path):
    out = tmp_path / "key"
    with pytest.raises(OSError, match="no space"), atomic_directory(out, replace=False) as tmp:
        (tmp / "train").mkdir()
        raise OSError("no space left on device")
    assert list(tmp_path.iterdir()) == []


# -- unique temporary names: two writers of one target, readers during the swap, leftovers of killed writers ------


def _slow_renames(monkeypatch, seconds: float = 0.02) -> None:
    """Every ``Path.rename`` pauses after it: a publish made of two renames shows its gap to other threads."""
    rename = Path.rename

    def slow(self: Path, target: Path) -> Path:
        out = rename(self, target)
        time.sleep(seconds)
        return out

    monkeypatch.setattr(Path, "rename", slow)


def _write_version(folder: Path, version: str) -> None:
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text(version)


def _version(folder: Path) -> str:
    """The version a whole export holds: ``missing`` if there is no folder, ``mixed`` for two writers' files.

    The folder is opened once and its files read through that handle, as one folder (opening ``folder/<file>``
    twice may read one file from the old folder and the next from the new one); ``removed`` if the folder
    was replaced and deleted while it was read.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        return "missing"
    try:
        found = set()
        for name in ("config.json", "model.safetensors"):
            with open(os.open(name, os.O_RDONLY, dir_fd=fd)) as fh:
                found.add(fh.read())
    except FileNotFoundError:
        return "removed"
    finally:
        os.close(fd)
    return found.pop() if len(found) == 1 else "mixed"


def test_two_writers_replacing_one_folder_at_once_both_succeed_and_one_whole_folder_wins(tmp_path, monkeypatch):
    out = tmp_path / "student"
    with atomic_directory(out) as tmp:
        _write_version(tmp, "v0")
    _slow_renames(monkeypatch)
    ready, errors = threading.Barrier(2), []

    def writer(version: str) -> None:
        try:
            with atomic_directory(out) as tmp:
                _write_version(tmp, version)
                ready.wait()  # both are mid-write, then both publish at the same moment
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in ("v1", "v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _version(out) in ("v1", "v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # neither writer left a folder behind


def test_a_reader_always_finds_a_whole_folder_while_it_is_replaced(tmp_path, monkeypatch):
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir(), b.mkdir()
    if not files._exchange(a, b):
        pytest.skip("this file system cannot swap two folders atomically (renameat2 RENAME_EXCHANGE)")
    a.rmdir(), b.rmdir()
    out = tmp_path / "student"
    with atomic_directory(out) as tmp:
        _write_version(tmp, "v0")
    _slow_renames(monkeypatch)
    done, seen = threading.Event(), []

    def reader() -> None:
        while not done.is_set():
            seen.append(_version(out))
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 6):
            with atomic_directory(out) as tmp:
                _write_version(tmp, f"v{i}")
                time.sleep(0.01)  # the reader reads the old folder meanwhile
    finally:
        done.set()
        thread.join()
    # Every read found the old export or the new one, whole (or one that was replaced while it was read).
    assert len(seen) > 10 and not {"missing", "mixed"} & set(seen), seen
    assert _version(out) == "v5"


def test_two_writers_of_one_file_never_publish_a_half_written_file(tmp_path):
    path = tmp_path / "report.json"
    texts = {"a": "a" * 2_000_000, "b": "b" * 3_000_000}
    errors, seen, done = [], [], threading.Event()

    def writer(key: str) -> None:
        try:
            for _ in range(20):
                atomic_write_text(path, texts[key])
        except Exception as err:
            errors.append(err)

    def reader() -> None:
        while not done.is_set():
            if path.exists():
                seen.append(path.read_text() in texts.values())

    threads = [threading.Thread(target=writer, args=(k,)) for k in texts]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == [] and seen and all(seen)
    assert path.read_text() in texts.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_dead_writers_are_removed_and_live_writers_files_kept(tmp_path):
    host, dead = files.host_name(), _dead_pid()
    dead_dir = tmp_path / f".student.{host}-{dead}-0123abcd.tmp"
    dead_file = tmp_path / f".report.json.{host}-{dead}-89abcdef.tmp"
    live = tmp_path / f".student.{host}-{os.getpid()}-0123abcd.tmp"
    foreign_old = tmp_path / f".student.otherhost-{os.getpid()}-0123abcd.old"
    foreign_new = tmp_path / ".student.otherhost-1-0123abcd.tmp"
    for folder in (dead_dir, live, foreign_old, foreign_new):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
    dead_file.write_text("half")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (two_days_ago, two_days_ago))
    with atomic_directory(tmp_path / "student") as tmp:
        _write_version(tmp, "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["student", live.name, foreign_new.name])


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "stats.json"
    atomic_write_text(path, "old")
    with pytest.raises(OSError, match="No space"), atomic_file(path) as tmp:
        tmp.write_text("ha")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_published_folders_have_the_umask_permissions_not_private_ones(tmp_path):
    with atomic_directory(tmp_path / "student") as tmp:
        _write_version(tmp, "v1")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o777 & ~umask
