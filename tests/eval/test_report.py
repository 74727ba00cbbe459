"""Evaluation beyond perplexity and the compression report: known answers, files, guard, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError
from distill.cost import cost_metrics, parameter_count
from distill.eval.heldout import generation_fidelity, heldout_metrics
from distill.eval.report import (
    build_report,
    compare,
    degradation_flags,
    summarize_modifications,
    to_markdown,
    write_report,
)
from distill.eval.tasks import LOCAL_TASKS, build_local_tasks, check_tasks, run_tasks, task_manager
from students import scratch
from tests.helpers import Oracle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from distill.data.corpus import embedded_corpus

    return build_local_tasks(embedded_corpus()[:20], tmp_path_factory.mktemp("tasks"), n_examples=12, seed=1)


def test_local_tasks_score_an_oracle_at_one_and_a_contrarian_at_zero(task_dir):
    rows = {
        name: [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]
        for name in ("lastword", "cloze")
    }
    assert len(rows["lastword"]) >= 10 and len(rows["cloze"]) >= 8
    assert all(len(r["choices"]) == 4 and r["choices"][r["label"]].strip() for r in rows["cloze"])
    truths = {(r["context"], r["target"]) for r in rows["lastword"]}
    truths |= {(r["context"], " " + r["choices"][r["label"]].lstrip()) for r in rows["cloze"]}
    truths |= {(r["context"], r["choices"][r["label"]]) for r in rows["cloze"]}
    manager = task_manager(task_dir, LOCAL_TASKS)  # local tasks only: lm-eval's own registry is not indexed
    assert sorted(manager.all_tasks) == sorted(LOCAL_TASKS)
    perfect = run_tasks(Oracle(truths), ["distill_lastword", "distill_cloze"], manager)
    assert perfect["distill_lastword"]["acc"] == 1.0
    assert perfect["distill_cloze"]["acc"] == 1.0
    wrong = run_tasks(Oracle(set()), ["distill_lastword"], manager)
    assert wrong["distill_lastword"]["acc"] == 0.0


def test_unknown_and_offline_tasks_are_refused(task_dir):
    manager = task_manager(task_dir)
    with pytest.raises(ConfigError, match=r"eval.tasks=\['distill_lastwrd'\]: unknown task 'distill_lastwrd'"):
        check_tasks(["distill_lastwrd"], manager)
    with pytest.raises(ConfigError, match="task 'hellaswag' needs its dataset"):
        run_tasks(Oracle(set()), ["hellaswag"], manager, limit=1)


def test_heldout_and_fidelity_known_answers(tiny_teacher):
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids.clone()}]
    copy = scratch.build(
        tiny_teacher,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    copy.load_state_dict(tiny_teacher.model.state_dict())
    other = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    res = heldout_metrics({"copy": copy, "other": other}, tiny_teacher, batches, 512)
    assert res["copy"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert res["copy"]["top1_agreement"] == 1.0
    assert res["other"]["kl_to_teacher"] > 0.001 and res["other"]["top1_agreement"] < 1.0
    # perplexity is exp(mean NLL), checked by hand
    logp = torch.log_softmax(copy(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert res["copy"]["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    prompts = ids[:, :8]
    assert generation_fidelity(copy, tiny_teacher.model, prompts, 6) == {"exact_match": 1.0, "token_agreement": 1.0}
    assert generation_fidelity(other, tiny_teacher.model, prompts, 6)["token_agreement"] < 1.0


def test_cost_counts_shared_tensors_once(tiny_teacher, tmp_path):
    model = scratch.build(tiny_teacher, hidden_size=32, num_layers=2, num_heads=2, tie_word_embeddings=True)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once already
    assert parameter_count(model) == n
    model.save_pretrained(tmp_path / "m")  # before sharing: save_pretrained refuses arbitrarily shared tensors
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight  # ALBERT-style sharing
    shared = model.model.layers[0].mlp.up_proj.weight.numel()
    assert parameter_count(model) == n - shared
    cost = cost_metrics(model, tmp_path / "m", probe=torch.tensor([[1, 2, 3]]), new_tokens=4, runs=2)
    assert cost["bits_per_weight"] == pytest.approx(32.0, rel=0.01)
    assert cost["bytes_memory"] >= 4 * cost["params"]
    assert cost["bytes_disk"] > 0 and cost["tokens_per_s"] > 0


def test_guard_flags_each_case_and_stays_quiet_on_a_copy():
    teacher = {"heldout/ppl": 10.0, "task/a/acc": 0.6, "task/b/acc": 0.8, "cost/bytes_memory": 1000.0}
    assert degradation_flags(teacher, dict(teacher)) == []
    small = {**teacher, "cost/bytes_memory": 100.0}
    assert [f["flag"] for f in degradation_flags(teacher, small)] == ["compression_ratio"]
    lies = {**teacher, "heldout/ppl": 10.5, "task/a/acc": 0.45, "task/b/acc": 0.75}
    flags = {f["flag"] for f in degradation_flags(teacher, lies)}
    assert flags == {"task_accuracy", "perplexity_lies"}
    honest = {**teacher, "heldout/ppl": 30.0, "task/a/acc": 0.58, "task/b/acc": 0.78}
    assert degradation_flags(teacher, honest) == []


def _ci(metric: str, low: float, high: float, n: int = 100) -> dict[str, float]:
    base = metric.rsplit("/", 1)[0]
    return {f"{metric}_ci_low": low, f"{metric}_ci_high": high, f"{base}/n": float(n)}


def test_task_guard_compares_intervals_and_falls_back_on_points():
    teacher = {"heldout/ppl": 10.0, "task/a/acc": 0.6, **_ci("task/a/acc", 0.5, 0.7)}
    # The point is below 0.9 × 0.6 = 0.54, but the student's interval reaches 0.9 × 0.5 = 0.45: noise, no flag.
    close = {"heldout/ppl": 30.0, "task/a/acc": 0.5, **_ci("task/a/acc", 0.40, 0.46)}
    assert degradation_flags(teacher, close) == []
    below = {**close, **_ci("task/a/acc", 0.30, 0.44)}
    (flag,) = degradation_flags(teacher, below)
    assert flag["flag"] == "task_accuracy" and flag["basis"] == "intervals"
    assert flag["student_ci"] == [0.30, 0.44] and "[0.300, 0.440]" in flag["message"]
    # Without intervals (an old report, a hub task without samples): the point comparison, and it says so.
    points = {"heldout/ppl": 30.0, "task/a/acc": 0.5}
    (flag,) = degradation_flags({"heldout/ppl": 10.0, "task/a/acc": 0.6}, points)
    assert flag["basis"] == "points" and "no intervals" in flag["message"]
    (flag,) = degradation_flags(teacher, points)  # one side without intervals is no interval comparison
    assert flag["basis"] == "points"
    # The interval bounds and counts are not accuracies of their own.
    assert {f["metric"] for f in degradation_flags(teacher, below)} == {"task/a/acc"}


def test_perplexity_lies_counts_only_separated_drops_when_intervals_exist():
    teacher = {"heldout/ppl": 10.0, "task/a/acc": 0.6, **_ci("task/a/acc", 0.55, 0.65)}
    overlapping = {"heldout/ppl": 10.2, "task/a/acc": 0.54, **_ci("task/a/acc", 0.48, 0.60)}
    assert degradation_flags(teacher, overlapping, min_task_fraction=0.5) == []
    separated = {"heldout/ppl": 10.2, "task/a/acc": 0.45, **_ci("task/a/acc", 0.40, 0.50)}
    (flag,) = degradation_flags(teacher, separated, min_task_fraction=0.5)
    assert flag["flag"] == "perplexity_lies" and flag["task_drop"] == pytest.approx(0.15)
    assert "intervals separate" in flag["message"]
    points = {k: v for k, v in overlapping.items() if "_ci_" not in k}
    (flag,) = degradation_flags({"heldout/ppl": 10.0, "task/a/acc": 0.6}, points, min_task_fraction=0.5)
    assert flag["flag"] == "perplexity_lies" and "point estimates for task/a/acc" in flag["message"]


def _tail(common: float, middle: float, rare: float, tokens: float = 300.0) -> dict[str, float]:
    return {
        **{f"tail/{b}/accuracy": a for b, a in (("common", common), ("middle", middle), ("rare", rare))},
        **{f"tail/{b}/tokens": tokens for b in ("common", "middle", "rare")},
    }


def test_long_tail_flag_compares_retention_of_rare_and_common_tokens():
    teacher = _tail(0.8, 0.5, 0.2)
    # Retention: common 0.72 / 0.8 = 0.9, rare 0.1 / 0.2 = 0.5: a gap of 0.4.
    (flag,) = degradation_flags(teacher, _tail(0.72, 0.4, 0.1))
    assert flag["flag"] == "long_tail"
    assert flag["retention_common"] == pytest.approx(0.9) and flag["retention_rare"] == pytest.approx(0.5)
    assert "0.500" in flag["message"] and "0.900" in flag["message"]
    # The same loss everywhere (retention 0.9 and 0.85) is no long-tail problem.
    assert degradation_flags(teacher, _tail(0.72, 0.45, 0.17)) == []
    assert [f["flag"] for f in degradation_flags(teacher, _tail(0.72, 0.45, 0.17), max_tail_gap=0.04)] == ["long_tail"]
    # No teacher accuracy on rare tokens, or no buckets at all: nothing to compare.
    assert degradation_flags(_tail(0.8, 0.5, 0.0), _tail(0.72, 0.4, 0.0)) == []
    assert degradation_flags({}, _tail(0.1, 0.1, 0.0)) == []


def test_interval_keys_fold_into_their_metric_row():
    teacher = {"task/a/acc": 0.6, **_ci("task/a/acc", 0.5, 0.7), "tail/rare/accuracy": 0.2, "docs/n": 3.0}
    student = {"task/a/acc": 0.4, **_ci("task/a/acc", 0.3, 0.5), "tail/rare/accuracy": 0.1}
    rows = {r["metric"]: r for r in compare(teacher, student)}
    assert set(rows) == {"task/a/acc", "task/a/n", "tail/rare/accuracy", "docs/n"}
    assert rows["task/a/acc"]["teacher_ci"] == [0.5, 0.7] and rows["task/a/acc"]["student_ci"] == [0.3, 0.5]
    assert rows["task/a/acc"]["higher_is_better"] is True and rows["tail/rare/accuracy"]["higher_is_better"]
    assert rows["task/a/n"]["higher_is_better"] is None and "teacher_ci" not in rows["task/a/n"]
    report = build_report(teacher, student, [], {}, {})
    assert "| task/a/acc | 0.6 [0.5, 0.7] | 0.4 [0.3, 0.5] |" in to_markdown(report)


# Reports of the evaluation before the test split (bench/results holds only re-measured ones now).
HEADLINE = ROOT / "tests" / "fixtures" / "old_eval" / "headline_runs"


def _records(run: str) -> list[dict]:
    """A committed run's modification records; runs no longer in the headline keep theirs in tests/eval/records."""
    kept = Path(__file__).parent / "records" / f"{run}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    return json.loads((HEADLINE / run / "report.json").read_text())["modifications"]


def test_modification_summaries_of_the_committed_runs():
    def lines(run: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        mods = _records(run)
        for m, text in zip(mods, summarize_modifications(mods), strict=True):
            out.setdefault(m["kind"], []).append(text)
        return out

    qat4 = lines("headline_distill_prune_qat4")
    assert qat4["distillation"] == [
        "teacher SmolLM2-135M-Instruct.Q4_1 → student from_teacher(num_layers=6); forward_kl loss (α=0.5, T=2.0); "
        "AdamW lr 0.001; 100 steps"
    ]
    assert qat4["prune"][0] == "MLP channels kept 1161 per layer (6 layers)"
    assert qat4["prune"][1] == (
        "query heads kept 6 per layer, KV heads kept 3 per layer, MLP channels 1161→934 per layer (6 layers)"
    )
    assert qat4["prune"][-1] == "MLP channels 774→768 per layer (6 layers)"
    assert qat4["qat"] == [
        "int4 weights in groups of 32, int8 dynamic activations (int8_dynact_int4_weight), "
        "skip `lm_head`, `*embed*`, `*norm*`"
    ]
    assert qat4["callback:prune"] == [
        "ProgressiveStructuredPruning: heads 6, target 0.5 (activation importance, cubic schedule, steps 0–50 every 10)"
    ]
    assert qat4["callback:qat"][0].startswith("QuantizationAwareTraining: scheme=int8_dynact_int4_weight, group_size")
    share = lines("headline_distill_share")
    assert share["share"] == [
        "layers tied in groups of 2: 0+1, 2+3, 4+5; rank-8 LoRA per layer on 7 projections "
        "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    ]
    assert "lora_targets=7 items" in share["callback:share"][0]  # the generic summary: lists by their size
    stacked = lines("headline_stacked_max")
    assert stacked["lowrank"] == ["42 linear layers factorised, rank 111–189 (median 161)"]
    assert stacked["share"] == ["layers tied in groups of 2: 0+1, 2+3, 4+5"]
    assert stacked["qat"] == ["int8 weights (int8_weight_only), skip `lm_head`, `*embed*`, `*norm*`"]
    assert stacked["callback:lowrank"][0].startswith("LowRankFactorization: targets=7 items, param_budget=0.6")
    assert summarize_modifications([{"kind": "magic", "config": {"x": 1, "ids": [1, 2, 3], "off": None}}]) == [
        "x=1, ids=3 items"
    ]


def test_markdown_summarizes_pruning_instead_of_listing_channels():
    report = json.loads((HEADLINE / "headline_distill_prune_qat4" / "report.json").read_text())
    channels = next(m for m in report["modifications"] if m["kind"] == "prune")["config"]["channels"][0]
    assert len(channels) > 1000  # the record itself keeps every index
    text = to_markdown(report)
    assert json.dumps(channels[:8])[1:-1] not in text
    assert max(len(line) for line in text.splitlines() if "channels" in line) < 300
    assert "MLP channels 1161→934 per layer" in text and "**qat**: int4 weights in groups of 32" in text
    # a report from before intervals, buckets and documents (only the records and the metrics) still renders
    old = {k: v for k, v in report.items() if k not in ("documents", "run", "notes")}
    old["modifications"] = _records("headline_stacked_max")
    assert "**lowrank**: 42 linear layers" in to_markdown(old)


def test_report_files_are_written_and_parse(tmp_path):
    teacher = {"heldout/ppl": 10.0, "task/a/acc": 0.6, "cost/bytes_memory": 1000.0}
    student = {"heldout/ppl": 12.0, "task/a/acc": 0.3, "cost/bytes_memory": 100.0, "cost/bytes_disk": 50.0}
    mods = [{"kind": "distillation", "config": {"alpha": 0.5}}, {"kind": "prune", "config": {"heads": 0.25}}]
    report = build_report(teacher, student, mods, {"seed": 1}, {"max_compression_ratio": 8.0})
    js, md = write_report(report, tmp_path)
    loaded = json.loads(js.read_text())
    assert loaded["degradation"]["degraded"] is True
    assert [m["kind"] for m in loaded["modifications"]] == ["distillation", "prune"]
    row = next(r for r in loaded["comparison"] if r["metric"] == "heldout/ppl")
    assert row["delta"] == pytest.approx(2.0) and row["rel_delta"] == pytest.approx(0.2)
    assert next(r for r in loaded["comparison"] if r["metric"] == "cost/bytes_disk")["teacher"] is None
    text = md.read_text()
    assert "| heldout/ppl | 10 | 12 | 2 | 20 |" in text and "compression_ratio" in text
    assert "torch" in loaded["versions"] and len(loaded["config_hash"]) == 12
    assert text == to_markdown(loaded)


def test_train_writes_report_and_plots(tiny_cfg, tmp_path):
    from train import train

    metrics, _ = train(tiny_cfg("trainer.max_steps=6", "trainer.val_check_interval=3"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["modifications"][0]["kind"] == "distillation"
    assert {
        "heldout/ppl",
        "task/distill_lastword/acc",
        "fidelity/token_agreement",
        "cost/params",
        "cost/compression_ratio",
    } <= set(report["metrics"]["student"])
    assert report["metrics"]["student"]["cost/bytes_disk"] > 0
    student, teacher = report["metrics"]["student"], report["metrics"]["teacher"]
    for side in (student, teacher):  # the buckets of the training split's counts, scored in the held-out pass
        assert {f"tail/{b}/{k}" for b in ("rare", "middle", "common") for k in ("accuracy", "tokens")} <= set(side)
    assert sum(student[f"tail/{b}/tokens"] for b in ("rare", "middle", "common")) > 0
    assert teacher["tail/common/top1_agreement"] == 1.0
    docs = report["documents"]
    fields = {"index", "tokens", "student_top1_agreement", "student_accuracy", "teacher_accuracy", "text"}
    assert docs and fields <= set(docs[0])
    assert student["docs/top1_agreement_min"] <= student["docs/top1_agreement_median"]
    text = (tmp_path / "report.md").read_text()
    assert "## Long tail" in text and "## Held-out documents" in text
    worst = min(docs, key=lambda d: (d["student_top1_agreement"] if d["tokens"] >= 32 else 2, d["index"]))
    assert f"| {worst['index']} | {worst['tokens']} |" in text
    for png in ("training_curves.png", "quality_vs_size.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert metrics["task/student/distill_cloze/acc"] == report["metrics"]["student"]["task/distill_cloze/acc"]


def _evaluate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, text=True, capture_output=True, timeout=300
    )


@pytest.mark.slow  # four interpreters, about 85 s loaded; bad input to train.py is tested in the default suite
def test_evaluate_cli_bad_input(tmp_path, tiny_teacher, cache_dir):
    common = [
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
        "teacher=tiny_random",
    ]
    proc = _evaluate([f"model={tmp_path}", *common], tmp_path)
    assert proc.returncode == 2 and "error: model=" in proc.stderr and "not a model" in proc.stderr
    proc = _evaluate(common, tmp_path)  # no model= at all: one line, before the baseline loads
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: model=???: ")
    # a baseline whose tokenizer differs from the model's
    from distill.models.tokenizer import train_tiny_tokenizer

    other_tok = train_tiny_tokenizer(300, cache_dir)
    other = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    other.save_pretrained(tmp_path / "m")
    other_tok.save_pretrained(tmp_path / "m")
    proc = _evaluate([f"model={tmp_path / 'm'}", *common], tmp_path)
    assert proc.returncode == 2 and "differs from teacher tokenizer" in proc.stderr
