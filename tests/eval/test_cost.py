"""Honest sizes: the deployable artifact on disk, bits per weight as stored, ratios against both teachers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distill.cost import cost_metrics, weight_file_bytes
from distill.eval.assess import Comparison, Provenance, _score_cost
from students import scratch


def test_bits_per_weight_on_disk_count_only_the_weight_files(tiny_teacher, tmp_path):
    model = scratch.build(tiny_teacher, hidden_size=32, num_layers=2, num_heads=2)
    model.save_pretrained(tmp_path / "m")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "m")
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert weight_file_bytes(tmp_path / "m") == weights
    cost = cost_metrics(model, tmp_path / "m")
    assert cost["bytes_disk"] > weights  # the folder also holds the config and the tokenizer
    assert cost["bits_per_weight_disk"] == pytest.approx(8 * weights / cost["params"])
    assert 32.0 <= cost["bits_per_weight_disk"] < 32.5  # fp32 weights plus the safetensors header
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert cost_metrics(model, tmp_path / "bf16")["bits_per_weight_disk"] == pytest.approx(16.0, rel=0.02)
    assert weight_file_bytes(tmp_path / "nope") is None


def test_ratios_divide_the_fp32_teacher_and_the_shipped_file_by_the_artifact(tiny_teacher, tmp_path, monkeypatch):
    student = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    student.save_pretrained(tmp_path / "s")
    monkeypatch.setattr(tiny_teacher, "shipped_bytes", 12_345, raising=False)
    sides: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    models = Comparison(student, tiny_teacher, tiny_teacher.tokenizer, DataLoader([]), 512)
    _score_cost(
        models, {"speed_runs": 0}, sides, torch.ones(1, 4, dtype=torch.long), Provenance(export_dir=tmp_path / "s")
    )
    t, s = sides["teacher"], sides["student"]
    disk = s["cost/bytes_disk"]
    assert t["cost/bytes_fp32"] == 4 * t["cost/params"]
    assert t["cost/bytes_disk"] == t["cost/bytes_shipped"] == 12_345  # the teacher on disk is the file it came from
    assert s["cost/ratio_vs_fp32_teacher"] == pytest.approx(4 * t["cost/params"] / disk)
    assert s["cost/ratio_vs_shipped_teacher"] == pytest.approx(12_345 / disk)
    assert t["cost/ratio_vs_shipped_teacher"] == 1.0
    assert s["cost/compression_ratio"] == pytest.approx(t["cost/bytes_memory"] / s["cost/bytes_memory"])
