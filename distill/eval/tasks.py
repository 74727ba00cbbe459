"""Task accuracy through lm-eval-harness, including two offline tasks built from the held-out corpus.

The local tasks need no download, so they run anywhere:

* ``distill_lastword``: LAMBADA-style. A held-out passage ends in a word; the model sees the passage
  without it and is right when the word is its greedy continuation (lm-eval's ``acc`` for
  ``loglikelihood`` tasks is exactly that).
* ``distill_cloze``: multiple choice. A held-out passage is followed by four candidate continuations,
  the true one and three drawn from elsewhere in the held-out text; the model picks by log-likelihood
  (``acc``, and ``acc_norm`` which normalises by length).

Hub tasks (``mmlu``, ``hellaswag``, ``arc_easy``, ...) run through lm-eval's own registry when their data
is available locally, and fail with a clear error when it is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.config import ConfigError
from distill.eval.intervals import bootstrap_interval
from distill.fingerprint import weights_hash

log = logging.getLogger("distill")

LOCAL_TASKS = ("distill_lastword", "distill_cloze")
# A text that ends in a plain word, possibly inside a closing bracket or quote: the context and the word.
_WORD_END = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[)\"'”’]*[.!?]?\s*$", re.S)
# A sentence ends at . ! or ? followed by space and a capital, a digit or an opening quote or bracket.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")
_CLAUSE_BREAK = re.compile(r"[,;] ")


def _is_prose(text: str) -> bool:
    """Mostly letters, and no interactive-session code (many docstrings carry doctests)."""
    return sum(c.isalpha() for c in text) > 0.7 * len(text) and ">>>" not in text


def _sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(paragraph) if s]


def _passages(texts: Sequence[str], min_chars: int = 100, max_chars: int = 250) -> list[str]:
    """Non-overlapping windows of whole sentences of prose, ``min_chars`` to ``max_chars`` long.

    Each paragraph is cut at sentence ends into consecutive windows, so a long paragraph gives several
    examples instead of one truncated one. A sentence longer than ``max_chars`` (a table, a run-on list)
    is skipped, and windows that are not prose (code, doctests, tables) are left out. Short windows keep
    scoring cheap: 500 examples of each task from 100-250 character windows are ~90k tokens of requests
    (150-400 would be ~130k), about 4 minutes for the 135M embedded teacher on two CPU cores.
    """
    out: list[str] = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            window: list[str] = []
            for sentence in [*_sentences(" ".join(para.split())), None]:  # None flushes the last window
                size = sum(len(s) + 1 for s in window) - 1
                if sentence is not None and size + 1 + len(sentence) <= max_chars:
                    window.append(sentence)
                    continue
                joined = " ".join(window)
                if len(joined) >= min_chars and _is_prose(joined):
                    out.append(joined)
                window = [sentence] if sentence is not None and len(sentence) <= max_chars else []
    return out


def build_local_tasks(texts: Sequence[str], out_dir: str | Path, n_examples: int = 500, seed: int = 0) -> Path:
    """Write the two local tasks' data (jsonl) and lm-eval task configs (yaml) into ``out_dir``.

    Args:
        texts: held-out documents (never seen in training).
        out_dir: folder to hold the tasks; pass it to :func:`run_tasks` as ``task_dir``.
        n_examples: examples per task (fewer when the text is short).
        seed: seed of the example choice and of the distractors.

    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    passages = _passages(texts)
    if len(passages) < 8:
        raise ConfigError(
            f"eval.tasks: the held-out text has only {len(passages)} prose passages, too few to build "
            "the local tasks; hold out more data (data.val_fraction) or drop the local tasks"
        )
    rng.shuffle(passages)
    lastword = _lastword_examples(passages, n_examples)
    cloze = _cloze_examples(passages, n_examples, rng)
    for name, rows in (("lastword", lastword), ("cloze", cloze)):
        (out / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _write_task_configs(out)
    return out


def _lastword_examples(passages: Sequence[str], n_examples: int) -> list[dict[str, str]]:
    """Passages cut after a sentence that ends in a plain word, split into the text before it and the word.

    The last sentence is tried first, then earlier ones while at least 80 characters of context remain,
    since a sentence ending in a name, a quote or a bracket has no plain last word to predict.
    """
    lastword = []
    for p in passages:
        if len(lastword) == n_examples:
            break
        sentences = _sentences(p)
        for k in range(len(sentences), 0, -1):
            m = _WORD_END.match(" ".join(sentences[:k]).rstrip("."))
            if m is None or len(m.group(1)) < 80:
                continue
            lastword.append({"context": m.group(1), "target": " " + m.group(2)})
            break
    return lastword


def _cloze_examples(passages: Sequence[str], n_examples: int, rng: random.Random) -> list[dict[str, Any]]:
    """A passage's start, its true continuation and three continuations taken from other passages.

    The passage is cut at its last sentence end that leaves at least 80 characters of context, else at
    its last clause break (comma or semicolon), else between two words. The distractors continue in the
    same way (a sentence start, text after a clause break, or mid-sentence words) and come from other
    passages, cut to the truth's number of words, and no choice keeps a final full stop: neither a capital
    letter, the length nor the end of a sentence gives the true continuation away.
    """
    pools = _openings(passages)
    cloze = []
    for i, p in enumerate(passages):
        if len(cloze) == n_examples:
            break
        context, rest, kind = _cloze_cut(p)
        # The truth stops at its sentence's end, as every distractor does.
        words = _opening((_sentences(rest) or [""])[0], 120).rstrip(".!?").split()
        if len(words) < 3:
            continue
        truth = " " + " ".join(words)
        distractors: list[str] = []
        for _ in range(50):  # bounded: repeated text could make distinct openings scarce
            j, other = rng.choice(pools[kind])
            start = rng.randrange(1, max(2, len(other) - len(words))) if kind == "words" else 0
            candidate = " " + " ".join(other[start : start + len(words)]).rstrip(".!?")
            if j != i and len(other) - start >= len(words) and candidate not in (truth, *distractors):
                distractors.append(candidate)
            if len(distractors) == 3:
                break
        else:
            continue
        choices = [truth, *distractors]
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return cloze


def _cloze_cut(passage: str, min_context: int = 80) -> tuple[str, str, str]:
    """``(context, continuation, kind)``: the passage cut after at least ``min_context`` characters.

    At the last sentence end that allows it (kind ``sentence``), else at the last clause break
    (``clause``), else at the word boundary nearest to 60 % of the passage (``words``).
    """
    sentences = _sentences(passage)
    for k in range(len(sentences) - 1, 0, -1):
        context = " ".join(sentences[:k])
        if len(context) >= min_context:
            return context, " ".join(sentences[k:]), "sentence"
    breaks = [m for m in _CLAUSE_BREAK.finditer(passage) if m.start() >= min_context]
    if breaks:
        return passage[: breaks[-1].start() + 1], passage[breaks[-1].end() :], "clause"
    space = passage.rfind(" ", 0, max(min_context, int(0.6 * len(passage))) + 1)
    return passage[:space], passage[space + 1 :], "words"


def _opening(text: str, max_chars: int) -> str:
    """The text, or its first words up to ``max_chars`` characters."""
    return text if len(text) <= max_chars else text[: max_chars + 1].rsplit(" ", 1)[0]


def _openings(passages: Sequence[str]) -> dict[str, list[tuple[int, list[str]]]]:
    """Where distractors start, by kind, as (passage index, words from there to the sentence end).

    ``words`` holds whole sentences: a distractor of that kind starts at a random word after the first.
    """
    pools: dict[str, list[tuple[int, list[str]]]] = {"sentence": [], "clause": [], "words": []}
    for i, p in enumerate(passages):
        for sentence in _sentences(p):
            pools["sentence"].append((i, sentence.split()))
            pools["words"].append((i, sentence.split()))
            pools["clause"] += [(i, sentence[m.end() :].split()) for m in _CLAUSE_BREAK.finditer(sentence)]
    return pools


def _write_task_configs(out: Path) -> None:
    """The lm-eval task configs of the two local tasks, reading the jsonl files beside them."""
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    tasks = {
        "distill_lastword": {
            "data": "lastword.jsonl",
            "output_type": "loglikelihood",
            "doc_to_target": "{{target}}",
            "metric_list": [acc],
        },
        "distill_cloze": {
            "data": "cloze.jsonl",
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [acc, {**acc, "metric": "acc_norm"}],
        },
    }
    for name, task in tasks.items():
        data = out / task.pop("data")
        config = {
            "task": name,
            "dataset_path": "json",
            "test_split": "test",
            # Targets and choices carry their own leading space, so lm-eval must not add a delimiter.
            "target_delimiter": "",
            "doc_to_text": "{{context}}",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            **task,
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def task_manager(task_dir: str | Path | None, tasks: Sequence[str] | None = None) -> Any:
    """lm-eval's TaskManager with the local tasks' folder added to its search path.

    Indexing lm-eval's own task registry (about 15,000 YAML files) takes seconds on every call, so it is
    skipped when ``tasks`` names only this project's local tasks; ``tasks=None`` always includes it.
    """
    from lm_eval.tasks import TaskManager

    local_only = tasks is not None and task_dir is not None and all(t in LOCAL_TASKS for t in tasks)
    return TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=not local_only)


def check_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Refuse unknown task names before anything runs."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hint = ", ".join(sorted(k for k in known if k.startswith(unknown[0][:4]))[:6]) or "see `lm-eval ls tasks`"
        raise ConfigError(
            f"eval.tasks={list(tasks)!r}: unknown task {unknown[0]!r}; local tasks are "
            f"{', '.join(LOCAL_TASKS)}; similar lm-eval tasks: {hint}"
        )


def validate_task_names(tasks: Sequence[str]) -> None:
    """Check task names before any training, so a typo does not surface only after the run."""
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    if hub:
        check_tasks(hub, task_manager(None))


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    manager: Any,
    limit: int | None = None,
    label: str | None = None,
    resamples: int = 1000,
    cache: TaskCache | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate an lm-eval ``LM`` on ``tasks``; returns task → {metric: value}.

    Beside each mean metric (``acc``, ``acc_norm``) come ``<metric>_ci_low`` / ``<metric>_ci_high``, a
    seeded 95 % bootstrap interval over the examples, and ``n``, the number of examples scored. A task
    whose data cannot be loaded (offline, not in the cache) raises a ConfigError naming it.

    Args:
        lm: the model, as an lm-eval ``LM`` (see :func:`hf_lm`).
        tasks: task names (local or from lm-eval's registry).
        manager: the TaskManager that knows them (:func:`task_manager`).
        limit: cap on examples per task (lm-eval's ``limit``).
        label: names the model in the one log line written per task (``student``, ``teacher``).
        resamples: bootstrap resamples per interval.
        cache: where this (frozen) model's earlier results are kept; a task found there is not run again.

    """
    check_tasks(tasks, manager)
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        cached = cache.load(task, limit, resamples) if cache is not None else None
        if cached is not None:
            results.update(cached)
            if label is not None:
                log.info("%s", describe_scores(task, label, cached.get(task, {})))
            continue
        start = time.perf_counter()
        out = _evaluate_one(lm, task, manager, limit)
        samples = out.get("samples") or {}
        scored = {name: _with_intervals(m, samples.get(name), resamples) for name, m in out["results"].items()}
        results.update(scored)
        if cache is not None:
            cache.store(task, limit, resamples, scored)
        if label is not None:
            log.info("%s", describe_scores(task, label, results.get(task, {}), time.perf_counter() - start))
    return results


def _evaluate_one(lm: Any, task: str, manager: Any, limit: int | None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on one task, quietly, keeping the per-example samples."""
    from lm_eval import simple_evaluate

    try:
        with quiet_evaluation():
            # verbosity=None: lm-eval would otherwise reconfigure its logger for the rest of the process.
            return simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=manager,
                limit=limit,
                log_samples=True,
                bootstrap_iters=0,
                verbosity=None,
            )
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
        if task in LOCAL_TASKS:
            raise
        raise ConfigError(
            f"eval.tasks: task {task!r} needs its dataset, which could not be loaded here "
            f"({type(err).__name__}: {str(err)[:160]}); run it where the hub is reachable, "
            "or pre-download it into the HF datasets cache"
        ) from err


def _with_intervals(metrics: dict[str, Any], samples: list[dict[str, Any]] | None, resamples: int) -> dict[str, float]:
    """A task's numeric metrics, plus a bootstrap interval for each that is a mean over its examples."""
    scores: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or "stderr" in key or key == "sample_len":
            continue
        metric, _, filt = key.partition(",")
        scores[metric] = float(value)
        per_example = [s[metric] for s in samples or [] if s.get("filter", filt) == filt and metric in s]
        # Only a metric that is the plain mean of its per-example values gets a bootstrap of that mean;
        # corpus-level metrics (perplexity, F1 over the corpus, ...) are aggregated otherwise.
        is_mean = (
            per_example
            and all(isinstance(v, (int, float)) for v in per_example)
            and abs(sum(per_example) / len(per_example) - float(value)) <= 1e-9
        )
        if is_mean:
            low, high = bootstrap_interval(per_example, resamples=resamples)
            scores[f"{metric}_ci_low"], scores[f"{metric}_ci_high"] = low, high
            scores["n"] = float(len(per_example))
    return scores


def describe_scores(task: str, label: str, scores: dict[str, float], seconds: float | None = None) -> str:
    """One line for the log: ``task distill_cloze (student): acc 0.412 [0.371, 0.455], n=500, 38 s``."""
    parts = []
    for metric, value in scores.items():
        if metric == "n" or metric.endswith(("_ci_low", "_ci_high")):
            continue
        interval = (
            f" [{scores[f'{metric}_ci_low']:.3f}, {scores[f'{metric}_ci_high']:.3f}]"
            if f"{metric}_ci_low" in scores
            else ""
        )
        parts.append(f"{metric} {value:.3f}{interval}")
    if "n" in scores:
        parts.append(f"n={int(scores['n'])}")
    parts.append("cached" if seconds is None else f"{seconds:.0f} s")
    return f"task {task} ({label}): " + ", ".join(parts)


class TaskCache:
    """A frozen model's task results on disk, one JSON file per task, named by a hash of what decides them.

    Every training run scores the same frozen teacher on tasks built from the same held-out text; the
    teacher's side need not be run again. The key holds the model (its identity, a fingerprint of its
    weights, its device and dtype, the batch size, which changes padding), the task (its name, its
    configuration and the bytes of its data file), ``limit``, the bootstrap settings and the versions of
    lm-eval, transformers and torch. Only the local tasks are cached: their data lies in ``task_dir`` and
    can be hashed, while a hub task's dataset could change under the same name.

    Args:
        folder: where the JSON files go.
        model_key: what identifies the model (see :meth:`for_model`).
        task_dir: the local tasks' folder (:func:`build_local_tasks`).

    """

    def __init__(self, folder: str | Path, model_key: dict[str, Any], task_dir: str | Path) -> None:
        self.folder = Path(folder)
        self.model_key = model_key
        self.task_dir = Path(task_dir)

    @classmethod
    def for_model(
        cls, folder: str | Path | None, identity: Any, model: Any, batch_size: int, task_dir: str | Path
    ) -> TaskCache | None:
        """A cache for ``model``, or None when caching is off (no folder) or the model has no stable identity."""
        if folder is None or not isinstance(identity, dict) or not identity:
            return None
        weights = model_fingerprint(model)
        if weights is None:
            return None
        return cls(folder, {"identity": identity, **weights, "batch_size": batch_size}, task_dir)

    def path(self, task: str, limit: int | None, resamples: int) -> Path | None:
        """The cache file of ``task``, or None for a task that is not cached (not local, data missing)."""
        config_file = self.task_dir / f"{task}.yaml"
        if task not in LOCAL_TASKS or not config_file.is_file():
            return None
        config = yaml.safe_load(config_file.read_text())
        # The data file's path changes with the run directory; its bytes are what count.
        data = Path(str((config.pop("dataset_kwargs", None) or {}).get("data_files", {}).get("test", "")))
        if not data.is_file():
            return None
        key = {
            "model": self.model_key,
            "task": config,
            "data": hashlib.sha256(data.read_bytes()).hexdigest(),
            "limit": limit,
            "resamples": resamples,
            "versions": {p: importlib.metadata.version(p) for p in ("lm_eval", "transformers", "torch")},
            "format": 1,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.folder / f"{task}-{digest}.json"

    def load(self, task: str, limit: int | None, resamples: int) -> dict[str, dict[str, float]] | None:
        """The stored results of ``task`` (task → {metric: value}), or None on a miss."""
        path = self.path(task, limit, resamples)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError):  # a damaged file is a miss; store() will replace it
            return None

    def store(self, task: str, limit: int | None, resamples: int, results: dict[str, dict[str, float]]) -> None:
        """Keep ``results`` of ``task``; written to a temporary file and renamed, so no reader sees half a file."""
        path = self.path(task, limit, resamples)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", delete=False) as tmp:
            try:
                json.dump({"model": self.model_key, "results": results}, tmp, indent=1, default=str)
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
        os.replace(tmp.name, path)


def model_fingerprint(model: Any) -> dict[str, str] | None:
    """What identifies a model's weights for the task cache: their exact bytes' hash, its device and dtype.

    The hash is :func:`~distill.fingerprint.weights_hash`, the one every model-keyed cache uses: it does
    not depend on the thread count or the device, so every later run finds the same results. The device and
    dtype stay in the key (the scores were computed there). None when a tensor has no plain bytes (meta,
    sharded or quantized tensor subclasses): such a model is not cached.
    """
    try:
        weights = weights_hash(model)
        first = next(model.parameters())
    except (RuntimeError, TypeError, NotImplementedError, StopIteration, AttributeError):
        return None
    return {"weights": weights, "device": first.device.type, "dtype": str(first.dtype)}


# Loggers that report lm-eval's, datasets' and transformers' internals (requests built, cache misses, model
# arguments ignored). The evaluation writes its own line per task instead.
_NOISY_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "evaluate")
# lm-eval modules whose progress bars (building requests, scoring them) cannot be switched off by argument.
_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def quiet_evaluation() -> Iterator[None]:
    """Silence lm-eval, ``datasets`` and transformers (log lines, warnings, progress bars) inside the block.

    Every setting touched is put back on exit, so the user's own logging configuration outlives it.
    """
    import datasets

    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [(lg, lg.level) for lg in loggers]
    bars = not datasets.are_progress_bars_disabled()
    modules = [importlib.import_module(name) for name in _TQDM_MODULES]
    bars_of = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        for module, bar in bars_of:
            module.tqdm = _silenced(bar)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        for module, bar in bars_of:
            module.tqdm = bar


def _silenced(bar: Any) -> Any:
    """``bar`` (a tqdm class) with ``disable=True`` forced, whatever the caller passes."""

    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return bar(*args, **kwargs)

    return make


def hf_lm(model: Any, tokenizer: Any, batch_size: int = 8) -> Any:
    """Wrap an in-memory transformers model and tokenizer as lm-eval's HFLM, on the model's device."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    with quiet_evaluation():  # HFLM warns that an in-memory model ignores most of its arguments
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
