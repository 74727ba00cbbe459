"""Evaluate a compressed model against its baseline: ``python evaluate.py model=<export|.gguf|.ckpt> [baseline=<dir>]``.

Writes ``report.md``, ``report.json`` and plots into the run directory (``logs/evaluate/runs/<run_name>``).
With ``fail_on_degradation=true`` it exits with code 3 when the degradation guard raises a flag, so CI
pipelines can gate on it. The settings are Hydra overrides of ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distill.compress.replay import replay
from distill.config import build, config_error, exit_on_config_error, require
from distill.eval.assess import Comparison, Provenance, assess
from distill.export.gguf import same_tokenization
from distill.models.loading import load_causal_lm
from distill.models.teacher import FrozenTeacher
from distill.models.tokenizer import load_tokenizer, shared_vocab_size
from distill.runtime.paths import export_root

log = logging.getLogger("distill")
DEGRADED_EXIT = 3


def read_checkpoint(p: Path, field_value: str) -> dict[str, Any]:
    """A training checkpoint, unpickled with ``weights_only=True``: tensors and plain containers only.

    A ``.ckpt`` is a pickle, and a full unpickle runs whatever code the file names, so a checkpoint from
    anywhere else could run code on load. What train.py's checkpoints hold (Lightning's loop and
    callback state, Adam's moments, the structure log and configs as dicts, lists, strings and numbers)
    loads under the restricted unpickler with no allow-list; anything else is refused, not trusted.
    """
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise config_error(
            "model",
            field_value,
            f"the checkpoint holds objects beyond tensors and plain containers ({first}); distill loads "
            "checkpoints with weights_only=True, so give the run's export folder (…/student) instead",
        ) from None


def load_model(path: str, fallback_tokenizer: Any) -> tuple[PreTrainedModel, Any, list[dict[str, Any]]]:
    """A model to evaluate, from an export folder or a training checkpoint, with its recorded changes."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        meta = json.loads((p / "distill.json").read_text()) if (p / "distill.json").is_file() else {}
        model = load_causal_lm(str(p), dtype="auto", field="model")
        tokenizer = (
            load_tokenizer(str(p), field="model") if (p / "tokenizer_config.json").is_file() else fallback_tokenizer
        )
        return model.eval(), tokenizer, meta.get("structure", [])
    if p.is_file() and p.suffix == ".gguf":
        # A deployable llama.cpp file, read by transformers' GGUF loader (dequantised to fp32): the report
        # measures the file's own weights, and its size on disk is the file's.
        model = load_causal_lm(str(p.parent), gguf_file=p.name, dtype="float32", field="model")
        tokenizer = load_tokenizer(str(p.parent), gguf_file=p.name, field="model")
        rows = model.get_input_embeddings().weight.shape[0]
        if fallback_tokenizer is not None and same_tokenization(tokenizer, fallback_tokenizer, rows):
            # transformers rebuilds the file's tokenizer in its own classes; one that tokenises as the
            # baseline's does is the baseline's, and the comparison below then accepts it.
            tokenizer = fallback_tokenizer
        return model.eval(), tokenizer, []
    if p.is_file() and p.suffix == ".ckpt":
        ckpt = read_checkpoint(p, path)
        if "student_config" not in ckpt:
            raise config_error(
                "model", path, "this checkpoint was not written by distill's train.py (no student_config)"
            )
        structure = ckpt.get("student_structure", [])
        if "student_config_initial" not in ckpt and structure:
            # The current config already holds the changes; replaying them onto it would cut twice.
            raise config_error(
                "model",
                path,
                "this checkpoint predates student_config_initial and its student was restructured "
                f"({', '.join(c['kind'] for c in structure)}); evaluate the run's export folder (…/student) instead",
            )
        config = dict(ckpt.get("student_config_initial") or ckpt["student_config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        replay(model, structure)
        state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
        model.load_state_dict(state, strict=True)
        return model.eval(), fallback_tokenizer, ckpt.get("student_structure", [])
    raise config_error(
        "model",
        path,
        "not a model: give an export folder written by train.py (…/student, with "
        "config.json), a GGUF file (…/student_gguf/student-q4_0.gguf) or a checkpoint (…/checkpoints/last.ckpt)",
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load model and baseline, check they share a tokenizer, and write the report."""
    require(cfg, "model")  # before the baseline loads, which takes a while
    torch.manual_seed(cfg.seed)
    if cfg.baseline:
        if not (Path(cfg.baseline) / "config.json").is_file():
            raise config_error("baseline", cfg.baseline, "not a model folder (no config.json); give an export folder")
        baseline = FrozenTeacher(
            load_causal_lm(cfg.baseline, dtype="auto", field="baseline"),
            load_tokenizer(cfg.baseline, field="baseline"),
            str(cfg.baseline),
        )
    else:
        baseline = build(cfg.teacher)
    model, tokenizer, changes = load_model(cfg.model, baseline.tokenizer)
    rows = model.get_output_embeddings().weight.shape[0]
    vocab = shared_vocab_size(baseline.tokenizer, tokenizer, baseline.vocab_size, rows, training=False)
    datamodule = build(cfg.data, tokenizer=baseline.tokenizer)
    datamodule.setup()
    about = Provenance(
        export_dir=cfg.model if Path(cfg.model).is_dir() or Path(cfg.model).suffix == ".gguf" else None,
        baseline_dir=cfg.baseline,
        modifications=[{"kind": c["kind"], "config": c["spec"]} for c in changes],
        config=OmegaConf.to_container(cfg, resolve=True),
        names=(baseline.name, str(cfg.model)),
    )
    models = Comparison(
        model,
        baseline,
        baseline.tokenizer,
        datamodule.val_dataloader(),
        vocab,
        token_counts=datamodule.train_token_counts(),  # the same data config, so the same training split
    )
    return assess(models, cfg.eval, cfg.paths.output_dir, about)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        report = evaluate(cfg)
    print(f"report: {Path(cfg.paths.output_dir) / 'report.md'}")
    if cfg.fail_on_degradation and report["degradation"]["degraded"]:
        print("degradation guard: " + "; ".join(f["message"] for f in report["degradation"]["flags"]), file=sys.stderr)
        sys.exit(DEGRADED_EXIT)


if __name__ == "__main__":
    export_root()
    main()
