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

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.config import ConfigError

LOCAL_TASKS = ("distill_lastword", "distill_cloze")
_WORD_END = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]?\s*$", re.S)


def _passages(texts: Sequence[str], min_chars: int = 200, max_chars: int = 600) -> list[str]:
    """Paragraph-sized passages of prose (code-like lines and short fragments are skipped)."""
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if min_chars <= len(para) and sum(c.isalpha() for c in para) > 0.7 * len(para):
                out.append(para[:max_chars])
    return out


def build_local_tasks(texts: Sequence[str], out_dir: str | Path, n_examples: int = 50, seed: int = 0) -> Path:
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
    """Passages cut after a sentence, split into the text before the last word and that word."""
    lastword = []
    for p in passages:
        sentence_end = p.rfind(".", 0, len(p) - 1)
        cut = p[: sentence_end + 1] if sentence_end > 100 else p
        m = _WORD_END.match(cut.rstrip("."))
        if m:
            lastword.append({"context": m.group(1), "target": " " + m.group(2)})
        if len(lastword) == n_examples:
            break
    return lastword


def _cloze_examples(passages: Sequence[str], n_examples: int, rng: random.Random) -> list[dict[str, Any]]:
    """A passage's start, its true continuation and three continuations taken from other passages."""
    cloze = []
    for i, p in enumerate(passages[:n_examples]):
        split = p.rfind(". ", 0, int(len(p) * 0.75))
        if split < 80:
            continue
        context, truth = p[: split + 1], " " + p[split + 2 : split + 2 + 120].rsplit(" ", 1)[0]
        others = [q for j, q in enumerate(passages) if j != i]
        distractors = []
        for q in rng.sample(others, 3):
            start = rng.randrange(0, max(1, len(q) - 130))
            distractors.append(" " + q[start : start + 120].split(" ", 1)[-1].rsplit(" ", 1)[0])
        choices = [truth, *distractors]
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return cloze


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


def run_tasks(lm: Any, tasks: Sequence[str], manager: Any, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Evaluate an lm-eval ``LM`` on ``tasks``; returns task → {metric: value}.

    A task whose data cannot be loaded (offline, not in the cache) raises a ConfigError naming it.
    """
    from lm_eval import simple_evaluate

    check_tasks(tasks, manager)
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        try:
            out = simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
            if task in LOCAL_TASKS:
                raise
            raise ConfigError(
                f"eval.tasks: task {task!r} needs its dataset, which could not be loaded here "
                f"({type(err).__name__}: {str(err)[:160]}); run it where the hub is reachable, "
                "or pre-download it into the HF datasets cache"
            ) from err
        for name, metrics in out["results"].items():
            results[name] = {
                k.split(",")[0]: float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"
            }
    return results


def hf_lm(model: Any, tokenizer: Any, batch_size: int = 8) -> Any:
    """Wrap an in-memory transformers model and tokenizer as lm-eval's HFLM, on the model's device."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
