"""Greedy-generation fidelity in the report: ``eval.fidelity_prompts`` prompts, 0 to skip it, negatives refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distill.config import ConfigError
from distill.data.datamodule import DistillDataModule
from distill.eval import assess as assess_module
from distill.eval.assess import Comparison, _score_fidelity, assess
from students import scratch

SETTINGS = {"max_batches": 1, "tasks": [], "new_tokens": 2, "speed_runs": 1, "prompt_tokens": 8}


def _comparison(tiny_teacher) -> Comparison:
    """A tiny student against the tiny teacher on one batch of four held-out blocks."""
    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = DistillDataModule.collate([{"input_ids": row} for row in ids])
    student = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    return Comparison(student, tiny_teacher, tiny_teacher.tokenizer, DataLoader([batch], batch_size=None), 512)


def test_fidelity_prompts_zero_skips_generation_and_keeps_the_speed_probe(tiny_teacher, tmp_path, monkeypatch):
    models = _comparison(tiny_teacher)
    sides: dict[str, dict[str, float]] = {"student": {}, "teacher": {}}
    prompts = _score_fidelity(models, {**SETTINGS, "fidelity_prompts": 2}, sides, torch.device("cpu"))
    assert prompts.shape == (2, 8) and 0 <= sides["student"]["fidelity/token_agreement"] <= 1

    # Before, 0 prompts reached `generate` with an empty batch and the report crashed there.
    monkeypatch.setattr(assess_module, "generation_fidelity", lambda *a, **k: pytest.fail("generation ran"))
    sides = {"student": {}, "teacher": {}}
    prompts = _score_fidelity(models, {**SETTINGS, "fidelity_prompts": 0}, sides, torch.device("cpu"))
    assert sides == {"student": {}, "teacher": {}}
    assert prompts.shape == (1, 8)  # the speed probe still has its prompt
    report = assess(models, {**SETTINGS, "fidelity_prompts": 0}, tmp_path / "run")
    assert not any(k.startswith("fidelity/") for side in report["metrics"].values() for k in side)
    assert report["metrics"]["student"]  # the rest of the report is there


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_fidelity_prompt_count_that_is_no_count_is_refused(value, tiny_teacher):
    sides: dict[str, dict[str, float]] = {"student": {}, "teacher": {}}
    with pytest.raises(
        ConfigError, match=rf"^eval.fidelity_prompts={value!r}: give a number of held-out prompts, or 0"
    ):
        _score_fidelity(_comparison(tiny_teacher), {**SETTINGS, "fidelity_prompts": value}, sides, torch.device("cpu"))
