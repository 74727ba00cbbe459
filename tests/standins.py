"""Tiny stand-ins for the models and files an advertised command names, so the command runs in seconds on a CPU.

A command such as ``python train.py student=tiny teacher=llama`` names a hub model the test machine does not
have; it runs here with the hub model replaced by a tiny random one of the same architecture, saved to a folder
and passed as ``teacher.path``. What the command itself chose (the recipe, the callbacks, the loss, the export)
is kept; only the sizes that make a run slow are shrunk (:func:`shrink`).

The stand-in teacher keeps what the documented commands count on, the depth of the embedded teacher (30 layers,
so ``student.num_layers=24`` means what it says) and 6 query heads in 3 KV groups (``distill_prune`` removes
one per group), at a width of 96 with 256-wide MLP rows (so the K-quants' 256-blocks fit the down projections).
A torchao group size the width does not take (the QAD recipes' 192, sized for SmolLM2's 576) becomes 32.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig, AutoModelForCausalLM

from distill.models.tokenizer import train_tiny_tokenizer

STANDIN_SHAPE = {
    "hidden_size": 96,
    "num_hidden_layers": 30,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 16,
    "intermediate_size": 256,
}
GGUF_NAME = "standin-f32.gguf"
# Multi-process and accelerator trainers have their own tests (tests/runtime, tests/test_train.py); a command
# that names one runs here on the one-process CPU trainer.
CPU_ONLY = ("cpu",)


def save_random_model(folder: Path, tokenizer: Any, model_type: str, tied: bool, seed: int = 0) -> Path:
    """A random model of ``model_type`` with the stand-in shape and ``tokenizer``, saved as a plain HF folder."""
    extra = {"attention_bias": True} if model_type == "qwen2" else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
        **STANDIN_SHAPE,
        **extra,
    )
    if model_type == "mistral":
        config.sliding_window = None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class StandIns:
    """Folders and files the stand-in mapping points commands at (built once per test session)."""

    root: Path
    cache_dir: Path

    def __post_init__(self) -> None:
        self.tokenizer = train_tiny_tokenizer(512, self.cache_dir)
        # transformers' GGUF tokenizer loader appends <|endoftext|> to a GPT-2-style vocabulary that lacks it, one
        # id past the embedding; the real teachers' files hold it, so the stand-ins' vocabulary does too.
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
        self._built: dict[str, Path] = {}

    def model(self, model_type: str = "llama", tied: bool = False) -> Path:
        """A random model folder of ``model_type`` (the stand-in for a hub teacher or a pretrained student)."""
        key = f"{model_type}-{'tied' if tied else 'untied'}"
        if key not in self._built:
            self._built[key] = save_random_model(self.root / key, self.tokenizer, model_type, tied)
        return self._built[key]

    def tiny_random_like(self) -> Path:
        """A random Llama folder with the tokenizer of ``teacher=tiny_random`` (a pretrained student for it)."""
        if "tiny_random_like" not in self._built:
            tokenizer = train_tiny_tokenizer(512, self.cache_dir)
            self._built["tiny_random_like"] = save_random_model(
                self.root / "tiny_random_like", tokenizer, "llama", tied=False
            )
        return self._built["tiny_random_like"]

    def gguf_teacher(self) -> Path:
        """A GGUF file of a tied random Llama with the tiny tokenizer: the stand-in for the embedded SmolLM2 file."""
        if "gguf" not in self._built:
            from distill.export.gguf import write_gguf

            source = self.model("llama", tied=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            write_gguf(model, self.tokenizer, self.root / "gguf", "f32", {}, pre="default")
            (self.root / "gguf" / "student-f32.gguf").rename(self.root / "gguf" / GGUF_NAME)
            self._built["gguf"] = self.root / "gguf"
        return self._built["gguf"]

    def gguf_teacher_like(self) -> Path:
        """A random Llama folder with the tokenizer transformers reads from :meth:`gguf_teacher` (a pretrained
        student for the embedded teacher: the GGUF file's tokenizer, as converted on load, is the one compared)."""
        if "gguf_like" not in self._built:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.gguf_teacher(), gguf_file=GGUF_NAME)
            self._built["gguf_like"] = save_random_model(self.root / "gguf_like", tokenizer, "llama", tied=False)
        return self._built["gguf_like"]

    def text_files(self) -> Path:
        """A folder of plain-text files (the stand-in for ``data.files='my/*.txt'``)."""
        folder = self.root / "text"
        if not folder.is_dir():
            from pydoc_data.topics import topics

            folder.mkdir(parents=True)
            for i, key in enumerate(sorted(topics)[:40]):
                (folder / f"doc{i:02d}.txt").write_text(topics[key])
        return folder

    def hub_dataset(self) -> Path:
        """A local dataset folder that ``datasets.load_dataset(path)`` reads (the stand-in for a hub dataset)."""
        folder = self.root / "hub_data"
        if not folder.is_dir():
            import json
            from pydoc_data.topics import topics

            folder.mkdir(parents=True)
            with (folder / "train.jsonl").open("w") as fh:
                for key in sorted(topics)[:40]:
                    fh.write(json.dumps({"text": topics[key]}) + "\n")
        return folder

    def teacher_cache(self, cfg: DictConfig) -> Path:
        """A top-k cache of the tiny random teacher for this command's data (built once per data key)."""
        from distill.config import build
        from distill.models.cache_builder import build_cache
        from distill.models.teacher import random_teacher

        teacher = random_teacher(cache_dir=self.cache_dir)
        datamodule = build(cfg.data, tokenizer=teacher.tokenizer)
        key = f"cache-{datamodule.data_key()}"
        if key not in self._built:
            datamodule.setup()
            source = {"_target_": "distill.models.teacher.random_teacher", "cache_dir": str(self.cache_dir)}
            build_cache(teacher, datamodule, self.root / key, top_k=8, batch_size=256, progress=False, source=source)
            self._built[key] = self.root / key
        return self._built[key]


def parse_command(command: str) -> tuple[str, list[str], bool]:
    """``(entry point, overrides, multirun)`` of one documented command line.

    The entry point is ``train`` or ``slurm.submit``; ``srun`` and ``make run ARGS=...`` wrappers are unwrapped.
    """
    words = shlex.split(command, comments=True)
    if words and words[0] == "srun":
        words = words[1:]
    if words[:2] == ["python", "train.py"]:
        entry, rest = "train", words[2:]
    elif words[:3] == ["python", "-m", "slurm.submit"]:
        entry, rest = "slurm.submit", words[3:]
    else:
        raise ValueError(f"not a command this test runs: {command!r}")
    multirun = any(w in ("-m", "--multirun") for w in rest)
    return entry, [w for w in rest if not w.startswith("-")], multirun


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The runs of a Hydra multirun: ``key=a,b,c`` (outside brackets) expanded into one override list per value."""
    points: list[list[str]] = [[]]
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
            points = [[*p, f"{key}={v}"] for p in points for v in value.split(",")]
        else:
            points = [[*p, item] for p in points]
    return points


STEP_KEYS = ("start_step", "end_step", "every_n_steps")


def shrink_schedule(cfg: DictConfig, steps: int, full: int) -> None:
    """Scale every compression callback's step settings from a ``full``-step run to a ``steps``-step one."""
    with open_dict(cfg):
        stages = [
            n
            for n in (cfg.get("callbacks") or {}).values()
            if n is not None and str(n.get("_target_", "")).startswith("callbacks.")
        ]
        for node in stages:
            for key in STEP_KEYS:
                if node.get(key) is not None:
                    scaled = int(node[key] * steps / max(full, 1))
                    node[key] = max(scaled, 1) if key == "every_n_steps" else min(scaled, steps - 1)
        for node in stages:  # after every node is scaled, so a later one does not undo what these set
            data_scored = node.get("importance", "activation") in ("activation", "taylor")
            if str(node._target_).startswith("callbacks.prune.") and data_scored and node.get("end_step") is not None:
                node.end_step = max(node.end_step, 1)  # its last cut scores a training batch before it
                # The stages after pruning (share → lowrank → sparsity → qat) start once it is done.
                for other in stages:
                    if other is not node and other.get("start_step") is not None:
                        other.start_step = max(other.start_step, node.end_step)
                        if other.get("end_step") is not None:
                            other.end_step = max(other.end_step, other.start_step)
            if node.get("importance") == "wanda":  # Wanda scores its calibration batches before the first cut
                node.calib_batches = 1
                node.start_step = max(node.start_step, 1)
                node.end_step = max(node.end_step, node.start_step)


def shrink(cfg: DictConfig, standins: StandIns, steps: int = 2) -> DictConfig:
    """Point ``cfg`` at stand-ins and shrink it to a ``steps``-step CPU run; what the command chose is kept."""
    full = cfg.trainer.max_steps if cfg.trainer.get("max_steps", -1) > 0 else 100
    with open_dict(cfg):
        _data(cfg, standins)  # first: a teacher cache is built for the data as the run will read it
        _teacher(cfg, standins)
        _student(cfg, standins)
        t = cfg.trainer
        t.accelerator, t.devices, t.num_nodes = "cpu", 1, 1
        t.pop("strategy", None)
        t.precision = "32-true"
        t.max_steps, t.max_time = steps, None
        t.val_check_interval, t.limit_val_batches, t.num_sanity_val_steps = 1, 1, 0
        t.accumulate_grad_batches = 1
        t.enable_model_summary = False
        cfg.trainer_extras.activation_checkpointing = False
        if cfg.get("callbacks"):
            if cfg.callbacks.get("model_checkpoint"):
                cfg.callbacks.model_checkpoint.every_n_train_steps = 1
            cfg.callbacks.progress_bar = None
            qat = cfg.callbacks.get("qat")
            if qat and qat.get("calibration_batches"):
                qat.calibration_batches = 1
            if qat and qat.get("group_size") and STANDIN_SHAPE["hidden_size"] % qat.group_size:
                qat.group_size = 32
        cfg.eval.update(
            {
                "max_batches": 2,
                "tasks": [],
                "task_examples": 10,
                "fidelity_prompts": 2,
                "new_tokens": 4,
                "speed_runs": 1,
            }
        )
        cfg.distill.optimizer.lr = min(float(cfg.distill.optimizer.get("lr", 1e-3)), 1e-2)
        if cfg.distill.get("scheduler") and "num_warmup_steps" in cfg.distill.scheduler:
            cfg.distill.scheduler.num_warmup_steps = 0
    shrink_schedule(cfg, steps, full)
    return cfg


def _given(node: DictConfig, key: str) -> bool:
    """Whether ``node.key`` names a file or folder that exists here (``???`` and hub ids do not)."""
    return not OmegaConf.is_missing(node, key) and node.get(key) is not None and Path(str(node[key])).exists()


def _teacher(cfg: DictConfig, standins: StandIns) -> None:
    node = cfg.teacher
    target = node.get("_target_", "")
    if target.endswith("load_teacher"):
        if node.get("package"):  # the embedded GGUF teacher
            node.package, node.path, node.gguf_file = None, str(standins.gguf_teacher()), GGUF_NAME
        elif not _given(node, "path"):  # a hub id or a folder of the user's
            kind = "qwen2" if "qwen" in str(node.get("path")).lower() else "llama"
            node.path, node.gguf_file = str(standins.model(kind)), None
        node.dtype = "float32"
    elif target.endswith("CachedTeacher") and not _given(node, "path"):
        node.path = str(standins.teacher_cache(cfg))


def _student(cfg: DictConfig, standins: StandIns) -> None:
    node = cfg.student
    if str(node.get("_target_", "")).endswith("pretrained.load") and not _given(node, "path"):
        # A pretrained student shares its teacher's tokenizer: the stand-ins', or the tiny random teacher's own.
        teacher = cfg.teacher
        if str(teacher.get("_target_", "")).endswith(("random_teacher", "CachedTeacher")):
            folder = standins.tiny_random_like()  # the stand-in cache is the tiny random teacher's
        elif teacher.get("gguf_file") == GGUF_NAME:  # _teacher ran first: the embedded teacher's stand-in
            folder = standins.gguf_teacher_like()
        else:
            folder = standins.model("llama")
        node.path, node.gguf_file = str(folder), None
    if str(node.get("_target_", "")).endswith("scratch.build") and node.get("hidden_size", 0) > 512:
        # The cluster recipe's 1.2B student: its shape kept in proportion, its size cut to the stand-in's.
        node.update({"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32})
        node.intermediate_size = 256


def _data(cfg: DictConfig, standins: StandIns) -> None:
    node = cfg.data
    if node.source == "text":
        files = OmegaConf.to_container(node.files) if OmegaConf.is_list(node.files) else [node.files]
        if not all(Path(str(f)).exists() for f in files):
            node.files = str(standins.text_files() / "*.txt")
    elif node.source == "hub":
        node.name, node.config_name, node.split = str(standins.hub_dataset()), None, "train"
    node.block_size, node.batch_size, node.eval_batch_size, node.num_workers = 32, 4, 4, 0
