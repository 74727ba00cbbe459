"""resume=auto skips and removes checkpoints cut short while they were written (a copy killed halfway)."""

from __future__ import annotations

import os
import zipfile

import torch

from distill.runtime.resume import resolve_resume


def test_a_checkpoint_cut_short_is_removed_and_the_newest_whole_one_resumed(tmp_path, caplog):
    good, cut = tmp_path / "step000005.ckpt", tmp_path / "step000010.ckpt"
    torch.save({"global_step": 5, "w": torch.zeros(1000)}, good)
    torch.save({"global_step": 10, "w": torch.zeros(1000)}, cut)
    os.truncate(cut, cut.stat().st_size // 2)  # newer, and half of it
    (tmp_path / "last.ckpt").symlink_to(good.name)
    os.utime(good, (1, 1))
    assert zipfile.is_zipfile(good) and not zipfile.is_zipfile(cut)
    assert resolve_resume("auto", tmp_path) in (str(good), str(tmp_path / "last.ckpt"))
    assert not cut.exists() and good.exists()
    assert "removing" in caplog.text and "step000010.ckpt, a checkpoint cut short" in caplog.text


def test_only_checkpoints_cut_short_start_fresh(tmp_path):
    cut = tmp_path / "step000005.ckpt"
    torch.save({"global_step": 5}, cut)
    os.truncate(cut, 40)
    assert resolve_resume("auto", tmp_path) is None and not cut.exists()


def test_a_deepspeed_checkpoint_folder_counts_as_whole(tmp_path):
    folder = tmp_path / "step000005.ckpt"
    folder.mkdir()
    (folder / "latest").write_text("global_step5")
    assert resolve_resume("auto", tmp_path) == str(folder)
