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
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distill.compress.replay import replay
from distill.config import ConfigOrigin, build, config_error, exit_on_config_error, require
from distill.eval.assess import Comparison, Provenance, assess, build_heldout
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


def split_record(path: str) -> dict[str, Any] | None:
    """The data splits a model was trained with, as train.py recorded them; None for a model it did not write.

    An export folder holds them in ``distill.json``; a GGUF file of a run is read with the run's ``student/``
    export next to its folder; a checkpoint holds them in the datamodule's state.
    """
    p = Path(path)
    meta_file = p / "distill.json" if p.is_dir() else p.parent.parent / "student" / "distill.json"
    if p.suffix == ".ckpt" and p.is_file():
        ckpt = read_checkpoint(p, path)
        return next((v["split"] for v in ckpt.values() if isinstance(v, dict) and "split" in v), None)
    if meta_file.is_file():
        return json.loads(meta_file.read_text()).get("data")
    return None


def use_recorded_split(cfg: DictConfig, record: dict[str, Any] | None, origin: ConfigOrigin | None) -> None:
    """Score on the splits the model trained with: its test split, never text it trained on.

    A data setting the user typed that differs from the record is refused (it would score the model on text it
    may have trained on); an untyped one takes the recorded value.
    """
    if not record:
        return
    settings = {f"data.{k}": record[k] for k in _RECORDED if k in record}
    settings["seed"] = record.get("seed", cfg.seed)
    for field, value in settings.items():
        now = OmegaConf.select(cfg, field)
        if now == value:
            continue
        if origin is not None and origin.typed(field):
            raise config_error(
                field,
                now,
                f"model={cfg.model} was trained with {field}={value!r}: its held-out documents differ from these, "
                "so the score would include text it trained on; leave it unset to rebuild the model's own split",
            )
        log.info("using the model's recorded %s=%r (the configured one was %r)", field, value, now)
        OmegaConf.update(cfg, field, value, force_add=True)
    with open_dict(cfg):
        cfg.data.seed = settings["seed"]


_RECORDED = (
    "source",
    "files",
    "name",
    "config_name",
    "split",
    "text_field",
    "block_size",
    "val_fraction",
    "test_fraction",
)


def check_split(datamodule: Any, record: dict[str, Any] | None, model: str) -> None:
    """Refuse when the rebuilt splits are not the recorded ones (another corpus, tokenizer or packing)."""
    here = datamodule.split_facts()["data_key"]
    if record and record.get("data_key") and here != record["data_key"]:
        raise config_error(
            "model",
            model,
            f"it was trained on data key {record['data_key']} but the data here gives {here} (the corpus files, "
            "the tokenizer or a data setting differ); evaluate with the data and tokenizer of the run",
        )


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


def evaluate(cfg: DictConfig, origin: ConfigOrigin | None = None) -> dict[str, Any]:
    """Load model and baseline, check they share a tokenizer, and write the report on the model's own test split."""
    require(cfg, "model")  # before the baseline loads, which takes a while
    record = split_record(cfg.model)
    use_recorded_split(cfg, record, origin)
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
    check_split(datamodule, record, cfg.model)
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
        build_heldout(cfg.eval, datamodule, baseline.tokenizer, cfg.paths.cache_dir),
        vocab,
        token_counts=datamodule.train_token_counts(),  # the same data config, so the same training split
    )
    return assess(models, cfg.eval, cfg.paths.output_dir, about)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    origin = ConfigOrigin.from_hydra()
    with exit_on_config_error(origin=origin.explain):
        report = evaluate(cfg, origin)
    print(f"report: {Path(cfg.paths.output_dir) / 'report.md'}")
    if cfg.fail_on_degradation and report["degradation"]["degraded"]:
        print("degradation guard: " + "; ".join(f["message"] for f in report["degradation"]["flags"]), file=sys.stderr)
        sys.exit(DEGRADED_EXIT)


if __name__ == "__main__":
    export_root()
    main()
