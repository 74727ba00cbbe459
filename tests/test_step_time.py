"""bench/step_time.py: the FLOP count, the GEMM list, the step's breakdown, and the bench on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from bench import step_time
from distill.config import ConfigError
from tests.helpers import tiny_llama
from tests.test_bench import bench_cfg


def _hand_count(model: torch.nn.Module) -> tuple[int, int, int]:
    """(N, H, A) of a tiny Llama, from its config alone."""
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer, c.vocab_size * c.hidden_size, c.num_hidden_layers * q


def test_step_flops_follow_the_formula_and_the_gemms_add_up_to_them():
    teacher = tiny_llama(vocab_size=512, num_hidden_layers=3)
    student = tiny_llama(vocab_size=512, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    batch, block, chunk = 4, 32, 40
    tokens, rows = batch * block, batch * (block - 1)
    flops = step_time.step_flops(teacher, student, batch, block)
    (nt, ht, at), (ns, hs, as_) = _hand_count(teacher), _hand_count(student)
    assert (flops["N_teacher"], flops["H_teacher"], flops["A_teacher"]) == (nt, ht, at)
    assert flops["teacher"] == 2 * nt * tokens + 2 * ht * rows + 4 * at * block * tokens
    assert flops["student"] == 6 * ns * tokens + 6 * hs * rows + 12 * as_ * block * tokens
    assert flops["total"] == flops["teacher"] + flops["student"]

    gemms = step_time.step_gemms(teacher, student, tokens, rows, chunk)
    # The output layers run on 124 rows in chunks of 40: three of 40 and one of 4.
    assert gemms[("linear", chunk, 64, 512)] == 3 and gemms[("linear", 4, 64, 512)] == 1  # the teacher's
    assert gemms[("wgrad", 512, chunk, 96)] == 3 and gemms[("dgrad", 4, 512, 96)] == 1  # the student's backward
    assert not any(op != "linear" and k == 64 for op, _, k, _ in gemms)  # the teacher has no backward
    matmul = sum(count * 2 * m * k * n for (_, m, k, n), count in gemms.items())
    attention = 4 * at * block * tokens + 12 * as_ * block * tokens
    assert matmul == flops["total"] - attention  # the GEMM list is the formula without attention


def test_gemm_peak_weighs_each_shape_by_its_count():
    gemms = {("linear", 8, 16, 32): 3, ("dgrad", 8, 32, 16): 1}
    seconds = {("linear", 8, 16, 32): 1e-3, ("dgrad", 8, 32, 16): 4e-3}
    peak = step_time.gemm_peak(gemms, seconds)
    flops = 2 * 8 * 16 * 32
    assert peak["flops_per_s"] == pytest.approx(4 * flops / 7e-3)
    assert peak["best_shape_flops_per_s"] == pytest.approx(flops / 1e-3)
    assert step_time.gemm_seconds("wgrad", 8, 16, 4, torch.float32, 1) > 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breakdown_gives_each_part_its_exclusive_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(step_time.time, "perf_counter", clock)
    breakdown = step_time.StepBreakdown()
    module = type("M", (), {"student": torch.nn.Linear(2, 2)})()
    breakdown.enter("teacher_forward")  # outside a step: not counted
    breakdown.on_train_batch_start(None, module)
    for t, action in [
        (1.0, ("enter", "teacher_forward")),
        (3.0, ("exit",)),
        (4.0, ("enter", "loss")),
        (5.0, ("enter", "teacher_forward")),  # the teacher's output layer inside the chunked loss
        (5.5, ("exit",)),
        (7.0, ("exit",)),
        (7.5, ("enter", "student_backward")),
        (9.0, ("exit",)),
    ]:
        clock.now = t
        getattr(breakdown, action[0])(*action[1:])
    clock.now = 10.0
    breakdown.on_train_batch_end()
    (step,) = breakdown.steps
    assert step["teacher_forward"] == 2.5 and step["loss"] == 2.5 and step["student_backward"] == 1.5
    assert step["other"] == 3.5 and sum(step.values()) == 10.0  # the parts partition the step


def test_bad_sections_and_grids_are_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^sections=\['nope'\]: choose among mfu, rounding, overhead"):
        step_time.run(bench_cfg("step_time", ["sections=[nope]", f"json={tmp_path / 'x.json'}"]))
    with pytest.raises(ConfigError, match=r"^rounding_kinds=\['q2_k'\]: choose among q8_0"):
        step_time.run(bench_cfg("step_time", ["sections=[rounding]", "rounding_kinds=[q2_k]"]))
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # two tiny 3-step runs and the GEMMs of their steps (about 40 s on 2 loaded cores)
def test_the_bench_times_qad_and_the_plain_copy_and_writes_what_it_printed(tmp_path, cache_dir, capsys):
    tiny = [f"paths.cache_dir={cache_dir}", f"data.cache_dir={cache_dir / 'data'}", "teacher=tiny_random"]
    tiny.append("distill.objective.chunked=true")  # the default run's loss path
    overrides = [
        "sections=[mfu,rounding]",
        "steps=2",
        "batch=2",
        "block=32",
        "peak_repeats=1",
        "rounding_repeats=1",
        "rounding_compile=false",
        "rounding_kinds=[q4_0,iq4_nl]",
        "teacher=tiny_random",
        f"paths.cache_dir={cache_dir}",
        f"json={tmp_path / 'step_time.json'}",
        "train_overrides=[" + ",".join(repr(t) for t in tiny) + "]",
    ]
    result = step_time.run(bench_cfg("step_time", overrides))
    assert json.loads((tmp_path / "step_time.json").read_text())["mfu"]["formula"] == step_time.FORMULA
    runs = result["mfu"]["runs"]
    assert set(runs) == {"qad_q4_mix", "qad_q4_mix_eager", "from_teacher"}
    for r in runs.values():
        assert len(r["step_seconds_each"]) == 2  # the warm-up step left out
        assert sum(r["parts_seconds"].values()) == pytest.approx(r["step_seconds"], rel=0.2)  # medians per part
        assert r["chunked_loss"] and r["parts_seconds"]["teacher_forward"] > 0
        assert r["mfu"]["fp32"] == pytest.approx(r["achieved_flops_per_s"] / r["peak"]["fp32"]["flops_per_s"])
        assert r["flops"]["total"] == runs["from_teacher"]["flops"]["total"]  # the same full-depth copy
    assert runs["qad_q4_mix"]["parts_seconds"]["rounding"] > 0 == runs["from_teacher"]["parts_seconds"]["rounding"]
    assert runs["qad_q4_mix_eager"]["parts_seconds"]["rounding"] > 0
    rounding = result["rounding"]
    assert rounding["base_step_seconds"] == runs["from_teacher"]["step_seconds"]
    assert set(rounding["kinds"]) == {"q4_0", "iq4_nl"} and 0 < rounding["kinds"]["q4_0"]["eager_share"] < 1
    printed = capsys.readouterr().out
    assert "MFU fp32" in printed and f"wrote {tmp_path / 'step_time.json'}" in printed
    table = (tmp_path / "step_time.md").read_text()  # the results file the docs include
    assert "| qad_q4_mix_eager |" in table and "| iq4_nl |" in table
