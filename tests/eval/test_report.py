"""Evaluation beyond perplexity and the compression report: known answers, files, guard, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from distill.config import ConfigError
from distill.eval.cost import cost_metrics, parameter_count
from distill.eval.heldout import generation_fidelity, heldout_metrics
from distill.eval.report import build_report, degradation_flags, to_markdown, write_report
from distill.eval.tasks import LOCAL_TASKS, build_local_tasks, check_tasks, run_tasks, task_manager
from students import scratch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from distill.data.corpus import embedded_corpus

    return build_local_tasks(embedded_corpus()[:20], tmp_path_factory.mktemp("tasks"), n_examples=12, seed=1)


class Oracle(LM):
    """An lm-eval LM that always knows the answer: the true continuation is its likeliest and greedy one."""

    def __init__(self, truths: set[tuple[str, str]]) -> None:
        super().__init__()
        self.truths = truths

    def loglikelihood(self, requests):
        return [(0.0, True) if tuple(r.args) in self.truths else (-100.0, False) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [0.0 for _ in requests]

    def generate_until(self, requests):
        return ["" for _ in requests]


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
    assert (tmp_path / "report.md").is_file()
    for png in ("training_curves.png", "quality_vs_size.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert metrics["task/student/distill_cloze/acc"] == report["metrics"]["student"]["task/distill_cloze/acc"]


def _evaluate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, text=True, capture_output=True, timeout=300
    )


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
