"""Atomic folder publishing: exports replace a finished folder; caches keep the one another process published."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.runtime.files import atomic_directory


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
