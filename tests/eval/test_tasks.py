"""The local tasks (passages, examples, held-out only), bootstrap intervals, the teacher's cache, quiet logs."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.datamodule import DistillDataModule
from distill.eval import tasks as task_module
from distill.eval.assess import Comparison, _score_tasks, _texts
from distill.eval.intervals import bootstrap_interval
from distill.eval.tasks import (
    LOCAL_TASKS,
    TaskCache,
    _cloze_examples,
    _lastword_examples,
    _passages,
    build_local_tasks,
    describe_scores,
    run_tasks,
    task_manager,
)
from students import scratch
from tests.helpers import Oracle

SENTENCES = [f"Sentence number {w} says something plain about the topic at hand." for w in "abcdefghijkl"]


def _rows(task_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_passages_are_consecutive_sentence_windows_of_prose():
    paragraph = " ".join(SENTENCES)
    code = "x = f(a, b)[0] + {k: v for k, v in items.items()} # " * 4
    doctest = ">>> import json Then the interpreter answers with a line of text that is long enough. " * 2
    too_long = "word " * 60 + "end."
    out = _passages([paragraph + "\n\n" + code + "\n\n" + doctest + "\n\n" + too_long])
    assert len(out) >= 3  # one long paragraph gives several examples, not one truncated one
    assert all(100 <= len(p) <= 250 and p.endswith(".") for p in out)
    assert " ".join(out) == paragraph[: len(" ".join(out))]  # in order, whole sentences, no overlap


def test_examples_are_cut_at_words_with_unrevealing_choices():
    passages = _passages([" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(12)])
    lastword = _lastword_examples(passages, 100)
    assert len(lastword) == len(passages)
    for row in lastword:
        assert re.fullmatch(r" [A-Za-z]{3,}", row["target"]) and len(row["context"]) >= 80
        assert any(p.startswith(row["context"] + row["target"]) for p in passages)
    cloze = _cloze_examples(passages, 100, random.Random(0))
    assert len(cloze) == len(passages)
    for row in cloze:
        truth = row["choices"][row["label"]]
        assert any(_flat(p).startswith(_flat(row["context"] + truth)) for p in passages)
        assert len({len(c.split()) for c in row["choices"]}) == 1  # same number of words
        assert len(set(row["choices"])) == 4 and not any(c.endswith(".") for c in row["choices"])
    assert len({r["label"] for r in cloze}) > 1


def test_default_heldout_split_gives_500_examples_per_task_from_heldout_text_only(tiny_teacher, cache_dir, tmp_path):
    # The embedded default (conf/data/embedded.yaml): 15 % of the tokens held out, blocks of 128.
    dm = DistillDataModule(tiny_teacher.tokenizer, block_size=128, val_fraction=0.15, cache_dir=str(cache_dir / "data"))
    dm.setup()
    held = _texts(dm.val_dataloader(), tiny_teacher.tokenizer)
    train_batches = [{"input_ids": dm.train_set[i : i + 1000]["input_ids"]} for i in range(0, len(dm.train_set), 1000)]
    heldout, train = _flat(" ".join(held)), _flat(" ".join(_texts(train_batches, tiny_teacher.tokenizer)))
    task_dir = build_local_tasks(held, tmp_path, n_examples=500)
    lastword, cloze = _rows(task_dir, "lastword"), _rows(task_dir, "cloze")
    assert len(lastword) == 500 and len(cloze) == 500
    assert all(_flat(r["context"] + r["target"]) in heldout for r in lastword)
    assert all(_flat(r["context"] + r["choices"][r["label"]]) in heldout for r in cloze)
    # Repeated paragraphs are removed from the corpus, so almost no context was also trained on.
    seen = sum(_flat(r["context"]) in train for r in lastword + cloze)
    assert seen <= 10, seen


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values) and low < 0.3 < high
    assert high - low == pytest.approx(2 * 1.96 * (0.3 * 0.7 / 100) ** 0.5, rel=0.2)  # the normal interval
    assert bootstrap_interval([1.0] * 20) == (1.0, 1.0)
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(100):  # a 95 % interval holds the true mean about 95 times in 100
        low, high = bootstrap_interval(rng.random(200) < 0.3, resamples=400, seed=int(rng.integers(1 << 30)))
        covered += low <= 0.3 <= high
    assert 85 <= covered <= 100
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory):
    from distill.data.corpus import embedded_corpus

    return build_local_tasks(embedded_corpus()[:30], tmp_path_factory.mktemp("tasks"), n_examples=40, seed=1)


def test_run_tasks_adds_intervals_and_counts_and_logs_one_line_per_task(small_tasks, caplog, capsys, monkeypatch):
    lastword, cloze = _rows(small_tasks, "lastword"), _rows(small_tasks, "cloze")
    half = {(r["context"], r["target"]) for r in lastword[::2]}
    truths = half | {(r["context"], r["choices"][r["label"]]) for r in cloze}
    manager = task_manager(small_tasks, LOCAL_TASKS)
    lm_eval_log = logging.getLogger("lm_eval")
    lm_eval_log.setLevel(logging.DEBUG)  # a user's own setting, which the evaluation must give back
    try:
        with caplog.at_level(logging.INFO):
            scores = run_tasks(Oracle(truths), list(LOCAL_TASKS), manager, label="student")
        assert lm_eval_log.level == logging.DEBUG
    finally:
        lm_eval_log.setLevel(logging.NOTSET)
    lw = scores["distill_lastword"]
    assert lw["n"] == len(lastword) and lw["acc"] == pytest.approx(len(half) / len(lastword))
    assert 0.0 < lw["acc_ci_low"] < lw["acc"] < lw["acc_ci_high"] < 1.0
    assert scores["distill_cloze"]["acc"] == 1.0 and scores["distill_cloze"]["n"] == len(cloze)
    assert (scores["distill_cloze"]["acc_ci_low"], scores["distill_cloze"]["acc_ci_high"]) == (1.0, 1.0)
    assert "acc_norm_ci_low" in scores["distill_cloze"]
    lines = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]
    assert sum(m.startswith("task distill_lastword (student): acc 0.5") for m in lines) == 1
    assert f"n={len(lastword)}, " in next(m for m in lines if m.startswith("task distill_lastword"))
    assert "%|" not in capsys.readouterr().err  # no progress bars
    # The same call without the silencing shows lm-eval's progress bars: the check above can fail.
    monkeypatch.setattr(task_module, "quiet_evaluation", contextlib.nullcontext)
    run_tasks(Oracle(truths), ["distill_lastword"], manager)
    assert "%|" in capsys.readouterr().err


def test_describe_scores_is_one_readable_line():
    scores = {"acc": 0.4123, "acc_ci_low": 0.371, "acc_ci_high": 0.455, "n": 500.0}
    assert describe_scores("distill_cloze", "student", scores, 38.2) == (
        "task distill_cloze (student): acc 0.412 [0.371, 0.455], n=500, 38 s"
    )
    assert describe_scores("t", "teacher", {"acc": 1.0}).endswith("acc 1.000, cached")


def _comparison(tiny_teacher) -> Comparison:
    """A tiny student against the tiny teacher, on held-out blocks made from the embedded corpus."""
    from distill.data.corpus import embedded_corpus

    tok = tiny_teacher.tokenizer
    ids = [t for doc in embedded_corpus()[:25] for t in [*tok(doc)["input_ids"], tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    student = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    batches = DataLoader([{"input_ids": b} for b in blocks.split(8)], batch_size=None)  # one held-out set
    return Comparison(student, tiny_teacher, tok, batches, 512)


def test_teacher_task_results_are_cached_until_the_task_data_changes(tiny_teacher, tmp_path, monkeypatch):
    import lm_eval

    models = _comparison(tiny_teacher)
    evaluated = []
    real = lm_eval.simple_evaluate

    def counting(**kwargs):
        evaluated.append("teacher" if kwargs["model"].model is tiny_teacher.model else "student")
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    settings = {"tasks": ["distill_lastword"], "task_examples": 30, "cache_dir": str(tmp_path / "cache")}
    first: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    _score_tasks(models, settings, tmp_path / "run1", first)
    assert evaluated == ["student", "teacher"]
    assert {"acc", "acc_ci_low", "acc_ci_high", "n"} <= {k.split("/")[-1] for k in first["teacher"]}
    assert first["teacher"]["task/distill_lastword/n"] == 30
    again: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    _score_tasks(models, settings, tmp_path / "run2", again)  # another run directory, the same task data
    assert evaluated == ["student", "teacher", "student"]
    assert again["teacher"] == first["teacher"]
    other: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    _score_tasks(models, {**settings, "task_examples": 20}, tmp_path / "run3", other)  # other task data
    assert evaluated[3:] == ["student", "teacher"] and other["teacher"]["task/distill_lastword/n"] == 20
    off: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    _score_tasks(models, {**settings, "cache_dir": None}, tmp_path / "run4", off)
    assert evaluated[5:] == ["student", "teacher"]


def test_task_cache_keys_on_the_data_bytes_and_needs_an_identity(tiny_teacher, small_tasks, tmp_path):
    model = tiny_teacher.model
    assert TaskCache.for_model(None, tiny_teacher.identity, model, 8, small_tasks) is None  # caching off
    assert TaskCache.for_model(tmp_path, None, model, 8, small_tasks) is None  # a plain model: no identity
    cache = TaskCache.for_model(tmp_path, tiny_teacher.identity, model, 8, small_tasks)
    assert cache is not None and cache.path("hellaswag", None, 1000) is None  # hub data cannot be hashed
    scores = {"distill_lastword": {"acc": 0.25, "acc_ci_low": 0.1, "acc_ci_high": 0.4, "n": 40.0}}
    cache.store("distill_lastword", None, 1000, scores)
    assert cache.load("distill_lastword", None, 1000) == scores
    assert cache.load("distill_lastword", 10, 1000) is None  # another limit
    assert (
        TaskCache.for_model(tmp_path, tiny_teacher.identity, model, 16, small_tasks).load(
            "distill_lastword", None, 1000
        )
        is None
    )  # another batch size
    copy = scratch.build(tiny_teacher, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    assert (
        TaskCache.for_model(tmp_path, tiny_teacher.identity, copy, 8, small_tasks).load("distill_lastword", None, 1000)
        is None
    )  # other weights under the same name
    data = small_tasks / "lastword.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original.replace(b'"target": " ', b'"target": "  ', 1))
        assert cache.load("distill_lastword", None, 1000) is None
    finally:
        data.write_bytes(original)
    assert cache.load("distill_lastword", None, 1000) == scores
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_the_task_cache_keys_a_model_by_its_exact_weight_bytes(tiny_teacher):
    import copy

    from distill.eval.tasks import model_fingerprint
    from distill.fingerprint import weights_hash

    model = copy.deepcopy(tiny_teacher.model)
    key = model_fingerprint(model)
    # One fingerprint for every model-keyed cache: the top-k teacher cache's and the continuations' too.
    assert key == {"weights": weights_hash(model), "device": "cpu", "dtype": "torch.float32"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # sums depended on the reduction order; bytes do not
        assert model_fingerprint(model) == key
    finally:
        torch.set_num_threads(threads)
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():  # two weights swapped: the same values in the tensor, other bytes
        weight[0, :2] = weight[0, :2].flip(0).clone()
    assert model_fingerprint(model)["weights"] != key["weights"]
    with torch.no_grad():
        weight[0, :2] = weight[0, :2].flip(0).clone()
    assert model_fingerprint(model) == key
    assert model_fingerprint(model.to(torch.bfloat16))["weights"] != key["weights"]
    with torch.device("meta"):  # no bytes to hash: not cached
        empty = type(model)(model.config)
    assert model_fingerprint(empty) is None


def test_ratio_interval_resamples_units_and_paired_statistics_see_the_same_draws():
    from distill.eval.intervals import ratio_interval, resample_interval

    num, den = [1.0, 3.0, 2.0, 8.0], [2.0, 4.0, 4.0, 10.0]  # ratio of sums 14 / 20
    low, high = ratio_interval(num, den)
    assert 0.5 <= low < 0.7 < high <= 0.8  # within the units' own ratios (0.5 ... 0.8)
    assert ratio_interval(num, den, transform=lambda x: 2 * x) == pytest.approx((2 * low, 2 * high))
    assert ratio_interval([2.0, 2.0], [4.0, 4.0]) == (0.5, 0.5)  # no spread, no width
    # Two statistics of one resample differ by a constant: the paired difference has no width at all.
    a = np.array([0.1, 0.5, 0.9, 0.3])
    assert resample_interval(lambda i: (a[i] + 1).mean() - a[i].mean(), 4) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="one length"):
        ratio_interval([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one unit"):
        resample_interval(lambda i: 0.0, 0)
