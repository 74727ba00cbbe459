"""Baselines every recipe is shown next to, measured by the recipes' own evaluation (:func:`~.assess.assess`).

Each baseline is the teacher in another form, or the recipe's student with no training; each gets a
deployable artifact folder (its size on disk is the report's) and a report against the fp32 teacher:

* ``teacher_fp32``: the teacher as loaded (GGUF dequantized), ``save_pretrained`` in fp32: the identity row;
* ``teacher_bf16``: the teacher cast to bfloat16, ``save_pretrained`` in bf16 and evaluated as reloaded;
* ``teacher_gguf``: the file the teacher ships as. transformers dequantizes a GGUF on load, so the model
  that runs is ``teacher_fp32``'s: its quality is reused from that report, only the size is the file's;
* ``ptq_int8`` / ``ptq_int4`` / ``ptq_int3``: torchao weight-only PTQ of every Linear *and* the token
  embedding (int8 per row, int4/int3 in groups of 32; ``ptq_int4_g192`` / ``ptq_int3_g192`` in groups of
  192, the grids of the ``qad_int4`` / ``qad_int3`` recipes), written by
  :func:`distill.export.quantized.save_quantized` (codes packed to their width). SmolLM2's output head is
  its token embedding: the one matrix is quantized once and stays tied (the file stores it once), as the
  fp32 and GGUF forms store it;
* ``bnb_int8`` / ``bnb_nf4``: bitsandbytes through transformers (``pip install -e '.[bnb]'``); where it does
  not run, the report says why instead of measuring;
* ``ptq_imatrix_depth_eighth`` / ``ptq_imatrix_depth_smallest``: llama.cpp files at 1/8 of the fp32 teacher made
  with no training (26 or 27 of its 30 layers by block influence, imatrix-weighted; the smallest full-depth file
  is 1/7.54): :data:`PTQ_IMATRIX_DEPTH`;
* ``ptq_int3_emb4_24layers``: ``experiment=qad_int3_emb4``'s 24 layers and grids (int3 layers, an int4 tied
  embedding/head) with no training: :data:`PTQ_DEPTH`;
* ``prune_noheal``: the student of a pruning recipe (``distill_prune``: ``from_teacher``, half the MLP
  channels, 6 of 9 heads, activation importance on its calibration batches) pruned once with no training.

The CE-only student is a recipe (``python train.py experiment=ce_only``), not built here.
:func:`ptq_curve` is the cheaper sweep of PTQ widths (bf16 to int2) for the cliff plot: held-out metrics only.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from bench import ROOT
from distill.compress.prune.selection import select
from distill.compress.prune.surgery import PRUNE, apply_spec, shapes
from distill.compress.quant import gguf_grid, schemes
from distill.compress.quant.type_map import ByteTarget, calibrated_type_map, check_target
from distill.config import build, config_error
from distill.cost import disk_bytes, memory_bytes, parameter_count, weight_file_bytes
from distill.data.sampler import StepBatchSampler
from distill.eval.assess import Comparison, Provenance, assess, build_heldout
from distill.eval.heldout import heldout_metrics
from distill.eval.report import build_report, write_report
from distill.eval.report import compare as compare_metrics
from distill.export.hf import compare_logits, export_student
from distill.export.quantized import META_FILE, save_quantized
from distill.models.loading import resolve_source
from distill.runtime.files import atomic_directory

log = logging.getLogger("distill")

# label → (torchao scheme, group size). Every Linear and the token embedding; a tied head stays tied.
PTQ: dict[str, tuple[str, int | None]] = {
    "ptq_int8": ("int8_weight_only", None),
    "ptq_int4": ("int4_weight_only", 32),
    "ptq_int3": ("int3_weight_only", 32),
    # The QAD recipes' own grids (groups of 192 fit SmolLM2's 576 and 1536 widths): the PTQ row of equal size.
    "ptq_int4_g192": ("int4_weight_only", 192),
    "ptq_int3_g192": ("int3_weight_only", 192),
}
PTQ_MODULES = ("linear", "embedding")
PTQ_SKIP: tuple[str, ...] = ()  # norms are neither Linear nor Embedding: nothing else to leave out
# The cliff curve: label → scheme (None: a cast to bf16, no integer grid).
CURVE: dict[str, str | None] = {
    "bf16": None,
    "int8": "int8_weight_only",
    "int6": "int6_weight_only",
    "int5": "int5_weight_only",
    "int4": "int4_weight_only",
    "int3": "int3_weight_only",
    "int2": "int2_weight_only",
}
BNB = ("bnb_int8", "bnb_nf4")
# label → GGUF type: the teacher written by this project's GGUF export (llama.cpp's block formats, every
# matrix in that type, norms F32) and measured as the file reloads. The PTQ rows of the gguf_* QAT schemes.
PTQ_GGUF: dict[str, str] = {"ptq_gguf_q4_0": "q4_0", "ptq_gguf_q8_0": "q8_0"}
# label → a QAT config of conf/callbacks/qat/ that gives llama.cpp types per tensor: the teacher written in
# that recipe's mix of types with no training (the PTQ row of qad_q4_mix).
PTQ_GGUF_MIX: dict[str, str] = {"ptq_gguf_q4_mix": "gguf_q4_mix"}
# label → (GGUF type, a QAT config's mix or {module glob: type}, or None): what a llama.cpp user makes with
# llama-imatrix on the training split and llama-quantize --imatrix, rounded by the ported quantizers
# (distill/compress/quant/llama_quants.py, byte for byte llama.cpp's). IQ4_NL is a 4.5-bit non-linear grid whose
# 32-blocks fit SmolLM2's 576-wide rows; the smallest file puts Q2_K on the 1,536-wide down projections.
PTQ_IMATRIX: dict[str, tuple[str, str | dict[str, str] | None]] = {
    "ptq_imatrix_q4_0": ("q4_0", None),
    "ptq_imatrix_iq4_nl": ("iq4_nl", None),
    "ptq_imatrix_q4_mix": ("q4_0", "gguf_q4_mix"),
    "ptq_imatrix_smallest": ("iq4_nl", {"*.mlp.down_proj": "q2_k"}),
}
# label → (layers kept, the file's budget as a fraction of the fp32 teacher's bytes, or a fixed mix): llama.cpp
# files at 1/8 of the fp32 teacher made with no training, below the smallest full-depth file (1/7.54 here: a 576-wide
# row takes no type under 4.5 bits per weight). The layers that change the residual stream least are dropped (block
# influence on the training split, as student=importance_depth chooses them), then llama-imatrix and llama-quantize
# --imatrix. ``eighth``: 26 layers on a byte-budgeted map of the QAT grids (the most layers those fit in 1/8; the QAD
# run at 1/8 keeps the same 26 on the same kind of map, so this is its no-training control); ``smallest``: 27
# layers as ptq_imatrix_smallest writes them (IQ4_NL, Q2_K on the 1,536-wide down projections), the other way a
# user gets under 1/8 (one layer more, two bits on a third of the weights).
PTQ_IMATRIX_DEPTH: dict[str, tuple[int, float | dict[str, str]]] = {
    "ptq_imatrix_depth_eighth": (26, 8.0),
    "ptq_imatrix_depth_smallest": (27, {"*": "iq4_nl", "*.mlp.down_proj": "q2_k"}),
}
# label → (layers kept, the layers' torchao grid, the tied embedding/head's grid): experiment=qad_int3_emb4's
# student and grids (24 layers by block influence, int3 in groups of 192, the table at int4 in groups of 96: 1/10 of
# the fp32 teacher) with no training, its control at equal bytes.
PTQ_DEPTH: dict[str, tuple[int, tuple[str, int], tuple[str, int]]] = {
    "ptq_int3_emb4_24layers": (24, ("int3_weight_only", 192), ("int4_weight_only", 96)),
}
# SmolLM2's tied token table by its two module names: one Parameter, so module_schemes gives both one grid.
TABLE = ("model.embed_tokens", "lm_head")
QAT_CONF = ROOT / "conf" / "callbacks" / "qat"
LABELS = (
    "teacher_fp32",
    "teacher_bf16",
    "teacher_gguf",
    *PTQ,
    *PTQ_GGUF,
    *PTQ_GGUF_MIX,
    *PTQ_IMATRIX,
    *PTQ_IMATRIX_DEPTH,
    *PTQ_DEPTH,
    *BNB,
    "prune_noheal",
)


@dataclass
class Bench:
    """What every baseline shares: the fp32 teacher, the recipes' data, and the settings.

    Attributes:
        cfg: the baselines config (``conf/bench/baselines.yaml``: teacher, data, eval, seed, ...).
        teacher: the live fp32 teacher (a FrozenTeacher), the reference of every report.
        datamodule: the recipes' data, set up (training split for calibration, validation for scoring).
        teacher_metrics: the teacher side of the first report written, for records that measure nothing.

    """

    cfg: DictConfig
    teacher: nn.Module
    datamodule: Any
    teacher_metrics: dict[str, float] | None = None
    imatrix: Any = None  # the teacher's importance matrix, collected once for every imatrix row

    @property
    def vocab_size(self) -> int:
        """The compared vocabulary: the teacher's (every baseline keeps it)."""
        return self.teacher.vocab_size

    @property
    def device(self) -> torch.device:
        """Where the models run (``cfg.device``)."""
        return torch.device(self.cfg.get("device") or "cpu")


@dataclass
class Candidate:
    """One baseline model ready to be assessed: the model, its artifact folder, and what to record."""

    model: nn.Module
    artifact: Path
    modifications: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Student cost figures that replace what distill.cost counts, for storage it does not understand.
    corrections: dict[str, float] = field(default_factory=dict)


def prepare(cfg: DictConfig) -> Bench:
    """Build the teacher and the data the way ``train.py`` does (seed first, then teacher, then data)."""
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, workers=True)
    teacher = build(cfg.teacher)
    datamodule = build(cfg.data, tokenizer=teacher.tokenizer)
    datamodule.setup("fit")
    bench = Bench(cfg, teacher, datamodule)
    teacher.to(bench.device)
    return bench


def compare(bench: Bench, model: nn.Module) -> Comparison:
    """The comparison a run's report makes (``distill.recipe.report.assess_run``), ``model`` in the student's place."""
    return Comparison(
        model,
        bench.teacher,
        bench.teacher.tokenizer,
        build_heldout(bench.cfg.eval, bench.datamodule, bench.teacher.tokenizer, bench.cfg.paths.cache_dir),
        bench.vocab_size,
        token_counts=bench.datamodule.train_token_counts(),  # the long-tail buckets, as train.py passes them
    )


# --- the baselines -------------------------------------------------------------------------------------


def teacher_fp32(bench: Bench, artifact: Path) -> Candidate:
    """The teacher as it runs (fp32), saved with ``save_pretrained``: quality 1 by construction, size 4 B/param."""
    model = bench.teacher.model
    export_student(model, bench.teacher.tokenizer, artifact, verify=True)
    return Candidate(model, artifact, facts={"dtype": "float32"})


def teacher_bf16(bench: Bench, artifact: Path) -> Candidate:
    """The teacher in bfloat16 (weights and compute): saved with ``save_pretrained``, evaluated as reloaded.

    The model assessed is the one loaded back from the artifact, not the in-memory cast: ``.to(bfloat16)``
    also rounds buffers (the rotary frequencies) that ``from_pretrained`` rebuilds in fp32, so the cast
    and the artifact differ slightly, and the artifact is what a user runs.
    """
    from transformers import AutoModelForCausalLM

    cast = copy.deepcopy(bench.teacher.model).to(torch.bfloat16)
    export_student(cast, bench.teacher.tokenizer, artifact, verify=False)
    del cast
    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.bfloat16).to(bench.device).eval()
    return Candidate(model, artifact, [{"kind": "cast", "config": {"dtype": "bfloat16"}}], {"dtype": "bfloat16"})


def gguf_file(cfg: DictConfig) -> Path | None:
    """The GGUF file the teacher is loaded from (found as :mod:`distill.models.loading` finds it), or None."""
    node = cfg.teacher
    name = node.get("gguf_file")
    if not name:
        return None
    return Path(resolve_source(node.get("path"), node.get("package"), name, "teacher")) / name


def ptq_spec(label: str) -> schemes.QuantSpec:
    """The torchao spec of a ``ptq_*`` baseline: every Linear and the token embedding."""
    scheme, group_size = PTQ[label]
    return schemes.make_spec(scheme, group_size, list(PTQ_SKIP), modules=PTQ_MODULES)


def ptq(bench: Bench, artifact: Path, spec: schemes.QuantSpec, model: nn.Module | None = None) -> Candidate:
    """Post-training quantization (torchao) of a copy of the teacher (or of ``model``), as the compact export."""
    model = copy.deepcopy(bench.teacher.model) if model is None else model
    tied = _tied_head(model)
    schemes.ptq(model, spec)
    save_quantized(
        model, bench.teacher.tokenizer, artifact, spec, extra={"source": bench.teacher.name, "method": "ptq"}
    )
    meta = json.loads((artifact / META_FILE).read_text())
    facts = {
        "scheme": spec.scheme,
        "group_size": spec.group_size,
        "modules": list(spec.modules),
        "tied_head": tied,
        "quantized_bits_per_weight_disk": meta["size"]["disk_bits_per_weight"],
        "quantized_bits_per_weight_memory": meta["size"]["bits_per_weight"],
    }
    notes = [
        f"torchao {spec.scheme} ({f'groups of {spec.group_size}' if spec.group_size else 'one scale per row'}, "
        "fp32 scale and int8 zero point each) on every nn.Linear and the token embedding; norms stay fp32. "
        "Codes are packed to their width on disk and kept one per byte in memory (torchao's CPU layout).",
    ]
    if spec.module_schemes:
        facts["module_schemes"] = [list(t) for t in spec.module_schemes]
        each = "; ".join(f"{g}: {k} in groups of {n}" for g, k, n in spec.module_schemes)
        notes.append(f"Per module instead (module_schemes): {each}.")
    if tied:
        notes.append(
            "The output head is tied to the token embedding: the matrix is quantized once and stays tied, "
            "stored once in the artifact (as in the fp32 and GGUF files)."
        )
    return Candidate(model, artifact, [{"kind": "ptq", "config": spec.to_dict()}], facts, notes)


def table_schemes(grid: tuple[str, int]) -> dict[str, dict[str, Any]]:
    """``module_schemes`` putting the tied table (:data:`TABLE`) on the torchao ``grid`` (scheme, group size)."""
    return {name: {"scheme": grid[0], "group_size": grid[1]} for name in TABLE}


def depth_student(bench: Bench, num_layers: int) -> PreTrainedModel:
    """The teacher less its least influential layers: what ``student=importance_depth`` keeps, built the same way."""
    from bench.studies.recipe import compose_train

    node = compose_train(["student=importance_depth", f"student.num_layers={num_layers}"], None).student
    model = build(node, teacher=bench.teacher, calibration=bench.datamodule.train_set)
    return model.to(bench.device).eval()


def ptq_depth(
    bench: Bench, artifact: Path, num_layers: int, layers: tuple[str, int], table: tuple[str, int]
) -> Candidate:
    """:func:`ptq` of :func:`depth_student` with the layers on one torchao grid and the tied table on another."""
    model = depth_student(bench, num_layers)
    spec = schemes.make_spec(*layers, list(PTQ_SKIP), "", PTQ_MODULES, None, table_schemes(table))
    cand = ptq(bench, artifact, spec, model)
    kept = model.layer_selection["kept"]
    cand.modifications.insert(0, {"kind": "layer_selection", "config": model.layer_selection})
    cand.facts["kept_layers"] = kept
    cand.notes.insert(
        0,
        f"The teacher's layers {kept} ({num_layers} of {bench.teacher.config.num_hidden_layers}, by block influence "
        "on the training split), no training.",
    )
    return cand


def mix_types(bench: Bench, model: nn.Module, qat_config: str) -> tuple[str, dict[str, str]]:
    """The scheme's llama.cpp type, and ``{weight name: type}`` on ``model``, of ``conf/callbacks/qat/<name>.yaml``.

    A config with a byte budget (``target_ratio`` or ``target_bytes``) gets the map its QAT run would choose at
    step 0 (the same calibration text and rule, ``budget_probe`` included:
    :func:`~distill.compress.quant.type_map.calibrated_type_map`); one with ``gguf_types`` gets those.
    """
    node = OmegaConf.load(QAT_CONF / f"{qat_config}.yaml")
    # Every matrix, as the recipe quantizes them (its modules and skip list are the experiment's, not the file's).
    types = node.get("gguf_types")
    base = schemes.make_spec(node.scheme, node.group_size, ["*norm*"], "", ["linear", "embedding"], types)
    target = check_target(base, node.get("target_ratio"), types, node.get("target_bytes"), node.get("budget_probe"))
    if target is not None:
        names = schemes.targets(model, ["*norm*"], ["linear", "embedding"])
        dm = bench.datamodule
        chosen = calibrated_type_map(
            model,
            names,
            dm.train_set,
            dm.block_size,
            target,
            gguf_grid.KINDS,
            bench.teacher.tokenizer,
            node.get("calibration_batches", 8),
            schemes.get_scheme(node.scheme).gguf if target.probe else None,  # as type_map.spec_on_budget probes
        )
        types = chosen.types
    spec = schemes.make_spec(node.scheme, node.group_size, ["*norm*"], "", ["linear", "embedding"], types)
    schemes.check_gguf_types(model, spec)
    names = schemes.targets(model, spec.skip, spec.modules)
    return schemes.get_scheme(spec.scheme).gguf, {f"{n}.weight": spec.gguf_kind(n) for n in names}


def teacher_imatrix(bench: Bench) -> Any:
    """The teacher's importance matrix over ``cfg.imatrix_batches`` batches of the training split (collected once).

    What ``llama-imatrix`` gathers on that text: the sum of each Linear input column's square over every token
    (:func:`distill.compress.quant.imatrix.collect`).
    """
    if bench.imatrix is None:
        bench.imatrix = model_imatrix(bench, bench.teacher.model)
    return bench.imatrix


def model_imatrix(bench: Bench, model: nn.Module) -> Any:
    """``model``'s importance matrix over ``cfg.imatrix_batches`` batches of the training split (as llama-imatrix)."""
    from distill.compress.depth import calibration_batches
    from distill.compress.quant import imatrix
    from distill.export.gguf import imatrix_modules

    dm = bench.datamodule
    rows = calibration_batches(
        dm.train_set, batches=int(bench.cfg.get("imatrix_batches", 32)), rows=4, tokens=dm.block_size
    )
    source = f"training split: {sum(r.numel() for r in rows)} tokens"
    return imatrix.collect(model, list(imatrix_modules(model)), rows, source)


def ptq_gguf(
    bench: Bench,
    artifact: Path,
    gguf_type: str,
    mix: str | dict[str, str] | None = None,
    weighted: bool = False,
) -> Candidate:
    """The teacher written as a GGUF file of ``gguf_type`` (post-training) and measured as transformers reloads it.

    With ``mix`` (a QAT config name, :data:`PTQ_GGUF_MIX`, or ``{module glob: type}``), each weight takes the
    type it gives. ``weighted``: rounded as ``llama-quantize --imatrix`` rounds, by :func:`teacher_imatrix`.
    """
    from distill.export.gguf import glob_types

    model = bench.teacher.model
    trained = None
    if isinstance(mix, str):
        gguf_type, trained = mix_types(bench, model, mix)
    elif mix is not None:
        trained = glob_types(model, mix)
    importance = teacher_imatrix(bench) if weighted else None
    reloaded, facts, counts = _write_gguf(bench, artifact, model, gguf_type, trained, importance)
    named = isinstance(mix, str)
    source = f"conf/callbacks/qat/{mix}.yaml's mix of types" if named else f"{gguf_type.upper()} with {mix}"
    what = (
        f"in {source} ({counts} matrices)"
        if trained
        else f"as {gguf_type.upper()} (llama.cpp's blocks of 32, every matrix including the tied embedding)"
    )
    rounding = (
        f"rounded as llama-quantize --imatrix rounds, weighted by the teacher's importance matrix "
        f"({bench.imatrix.datasets[0]})"
        if weighted
        else "rounded to nearest"
    )
    notes = [
        f"The teacher written by distill.export.gguf {what}, {rounding}, norms F32, and measured as "
        "transformers' GGUF loader reloads it. In memory it runs dequantized (fp32); the size on disk is the file's.",
    ]
    config: dict[str, Any] = {"type": gguf_type, "imatrix": weighted}
    if trained:
        config["gguf_types"] = dict(trained)
    return Candidate(reloaded, artifact, [{"kind": "ptq_gguf", "config": config}], facts, notes)


def _write_gguf(
    bench: Bench, artifact: Path, model: nn.Module, gguf_type: str, trained: dict[str, str] | None, importance: Any
) -> tuple[nn.Module, dict[str, Any], str]:
    """``model`` written as a GGUF file (``importance``: imatrix-weighted) and reloaded as transformers reads it.

    Returns the reloaded model (dequantized to fp32: what the evaluation measures), the file's facts, and the
    type counts of ``trained`` as a phrase ("94 IQ4_NL, 25 Q3_K").
    """
    from distill.export.gguf import export_gguf, teacher_pre

    weights = importance.by_weight() if importance is not None else None
    pre, name = teacher_pre(bench.cfg.teacher), bench.teacher.name
    check = export_gguf(
        model, bench.teacher.tokenizer, artifact, gguf_type, trained, pre=pre, name=name, importance=weights
    )
    file = check.file
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    facts: dict[str, Any] = {
        "gguf_type": gguf_type,
        "gguf_bytes": check.bytes,
        "tokenizer_matches": check.tokenizer_matches,
    }
    if trained:
        facts["gguf_types"] = dict(sorted(Counter(trained.values()).items()))
    facts["imatrix"] = importance is not None
    counts = ", ".join(f"{n} {k.upper()}" for k, n in facts.get("gguf_types", {}).items())
    return reloaded.to(bench.device).eval(), facts, counts


def ptq_imatrix_depth(bench: Bench, artifact: Path, num_layers: int, types: float | dict[str, str]) -> Candidate:
    """The teacher less its least influential layers, written with no training as an imatrix-weighted GGUF file.

    The layers are the ones ``student=importance_depth student.num_layers=<num_layers>`` keeps (that config, built
    on the training split); the types are a fixed ``{glob: type}`` mix, or chosen by
    :func:`~distill.compress.quant.type_map.calibrated_type_map` for ``1/types`` of the fp32 *teacher's* bytes; the
    rounding is ``llama-quantize --imatrix``'s, weighted by the shallower model's own importance matrix
    (llama-imatrix runs on the model it quantizes).
    """
    from distill.export.gguf import glob_types

    teacher, dm = bench.teacher, bench.datamodule
    model = depth_student(bench, num_layers)
    kept, extra = model.layer_selection["kept"], {}
    if isinstance(types, dict):
        trained = glob_types(model, types)
        how = f"in {types}"
    else:
        budget = ByteTarget(bytes=int(4 * parameter_count(teacher.model) / types))
        names = schemes.targets(model, ["*norm*"], ["linear", "embedding"])
        kinds = gguf_grid.KINDS
        chosen = calibrated_type_map(model, names, dm.train_set, dm.block_size, budget, kinds, teacher.tokenizer)
        if chosen.file_bytes > chosen.budget:  # a row labelled 1/8 that is larger would mislead every table
            raise ValueError(f"{num_layers} layers do not fit 1/{types:g} of the teacher: {chosen.summary()}")
        trained = {f"{n}.weight": k for n, k in chosen.types.items()}
        how = f"on a map chosen for 1/{types:g} of the fp32 teacher's bytes"
        extra["budget_bytes"] = budget.bytes
    importance = model_imatrix(bench, model)
    reloaded, facts, counts = _write_gguf(bench, artifact, model, "q4_0", trained, importance)
    facts |= {"kept_layers": kept, **extra}
    notes = [
        f"The teacher's layers {kept} ({num_layers} of {teacher.config.num_hidden_layers}, by block "
        f"influence on the training split; no training) written by distill.export.gguf {how} ({counts} matrices), "
        f"rounded as llama-quantize --imatrix rounds, weighted by this model's own importance matrix "
        f"({importance.datasets[0]}), and measured as transformers' GGUF loader reloads it.",
    ]
    mods = [
        {"kind": "layer_selection", "config": model.layer_selection},
        {"kind": "ptq_gguf", "config": {"type": "q4_0", "imatrix": True, "gguf_types": trained}},
    ]
    return Candidate(reloaded, artifact, mods, facts, notes)


def _tied_head(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def bnb(bench: Bench, artifact: Path, kind: str, source: Path) -> Candidate:
    """The teacher in bitsandbytes int8 (LLM.int8) or nf4, loaded by transformers from an fp32 folder.

    Raises whatever bitsandbytes raises where it does not run; :func:`run_baseline` records that instead.
    """
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # LLM.int8 warns on every forward that it casts fp32 inputs to fp16; once in the report's notes is enough.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if kind == "bnb_int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bench.teacher.model.dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=qconfig, device_map=str(bench.device), dtype=bench.teacher.model.dtype
    ).eval()
    with atomic_directory(artifact) as tmp:
        model.save_pretrained(tmp)
        bench.teacher.tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map=str(bench.device)).eval()
        compare_logits(model, reloaded, f"bitsandbytes export at {artifact}", atol=0.0)
    counted, state = _bnb_storage(model)
    weights = parameter_count(bench.teacher.model)  # nf4 packs two weights per uint8 element: count the source's
    files = weight_file_bytes(artifact) or 0
    corrections = {
        "cost/params": float(weights),
        "cost/bytes_memory": float(counted + state),
        "cost/bits_per_weight": 8 * (counted + state) / weights,
        "cost/bits_per_weight_disk": 8 * files / weights,
    }
    facts = {"bitsandbytes_version": bitsandbytes.__version__, "quantization_config": qconfig.to_dict()}
    notes = [
        "bitsandbytes through transformers' BitsAndBytesConfig: its default leaves the output head (tied to the "
        "token embedding here) and the embedding in the model's dtype."
        + (" LLM.int8 casts fp32 inputs to fp16 for its int8 matmul." if kind == "bnb_int8" else ""),
        "cost/params, bytes_memory, bits_per_weight(_disk) and compression_ratio are corrected for bitsandbytes' "
        "storage, which distill.cost counts short: nf4 packs two weights per uint8 element (params would "
        f"read {parameter_count(model):,}), and the quantization state (scales, absmax: {state / 1e6:.2f} MB) "
        "lives outside parameters and buffers. The uncounted figures are in the run facts.",
    ]
    mods = [{"kind": "bitsandbytes", "config": qconfig.to_dict()}]
    return Candidate(model, artifact, mods, facts, notes, corrections)


def _bnb_storage(model: nn.Module) -> tuple[int, int]:
    """Bytes of the parameters/buffers, and bytes of bitsandbytes' quantization state held beside them.

    int8 keeps a per-row scale (``SCB``) on the weight, which its first forward moves to the module's
    ``state``; nf4 keeps a ``quant_state`` (absmax per block, the code table, and with double quantization a
    nested state). Tensors found in several places count once.
    """
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        found = [getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)]
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            nested = getattr(qs, "state2", None)
            found += [getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(nested, "absmax", None)]
        seen.update({id(t): t for t in found if isinstance(t, torch.Tensor)})
    return memory_bytes(model), sum(t.numel() * t.element_size() for t in seen.values())


def prune_recipe(cfg: DictConfig) -> DictConfig:
    """The pruning recipe's composed ``conf/train.yaml`` (``experiment=<cfg.prune_recipe>`` + ``recipe_overrides``)."""
    from bench.studies.recipe import compose_train

    overrides = [f"experiment={cfg.prune_recipe}", *(cfg.get("recipe_overrides") or [])]
    return compose_train(overrides, None, quiet=False)  # read for its student and pruner only


def prune_once(
    student: nn.Module, pruner: Any, train_batches: Iterable[dict[str, torch.Tensor]], calib: int
) -> dict[str, Any]:
    """One-shot structured pruning to the pruner's final widths, scored on ``calib`` batches; no training.

    ``pruner`` is a :class:`callbacks.prune.ProgressiveStructuredPruning` (its targets and importance);
    returns the applied spec (what a run records as its ``prune`` structure change).
    """
    pruner.original = shapes(student)
    pruner.final = pruner.plan.final_sizes(pruner.original)
    device = next(student.parameters()).device
    pruner.scores.attach(student)
    pruner.scores.collecting = True
    student.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(train_batches):
                if i >= calib:
                    break
                student(input_ids=batch["input_ids"].to(device), use_cache=False)
    finally:
        pruner.scores.collecting = False
        pruner.scores.detach()
    # The widths the schedule reaches at its last step, as the callback's final pruning step selects them.
    spec = select(pruner.scores, student, pruner.sizes_at(pruner.end_step))
    apply_spec(student, spec)
    return spec


def first_train_batches(datamodule: Any, n: int, seed: int) -> Iterable[dict[str, torch.Tensor]]:
    """The first ``n`` training batches a run with this seed sees (steps ``0..n-1``)."""
    sampler = StepBatchSampler(len(datamodule.train_set), datamodule.batch_size, n, seed=seed)
    for idx in sampler:
        yield datamodule.collate([datamodule.train_set[i] for i in idx])


def prune_noheal(bench: Bench, artifact: Path) -> Candidate:
    """The pruning recipe's student pruned once at its final widths, on its calibration batches, zero steps."""
    recipe = prune_recipe(bench.cfg)
    student = build(recipe.student, teacher=bench.teacher).to(bench.device)
    node = OmegaConf.to_container(recipe.callbacks.prune, resolve=True)
    pruner = build(recipe.callbacks.prune)
    calib = int(node["calib_batches"])
    before = shapes(student)
    spec = prune_once(student, pruner, first_train_batches(bench.datamodule, calib, bench.cfg.seed), calib)
    export_student(student, bench.teacher.tokenizer, artifact, verify=True)
    facts = {
        "prune_recipe": bench.cfg.prune_recipe,
        "calib_batches": calib,
        "shapes_before": before,
        "shapes_after": shapes(student),
    }
    mods = [
        {"kind": "student", "config": OmegaConf.to_container(recipe.student, resolve=True)},
        {"kind": PRUNE.name, "config": spec},
    ]
    targets = ", ".join(f"{k}={node[k]}" for k in _targets(node))
    notes = [
        f"{bench.cfg.prune_recipe}'s student and pruning targets ({targets}, {node['importance']} importance on "
        f"the first {calib} training batches), pruned once; 0 training steps."
    ]
    return Candidate(student, artifact, mods, facts, notes)


def _targets(node: dict[str, Any]) -> list[str]:
    return [k for k in ("heads", "channels", "target", "layers") if node.get(k) is not None]


# --- measuring and writing -----------------------------------------------------------------------------


def measure(bench: Bench, label: str, cand: Candidate, run_dir: Path, seconds: float) -> dict[str, Any]:
    """Assess ``cand`` against the fp32 teacher exactly as ``train.py`` assesses a student; write the report."""
    about = Provenance(
        export_dir=cand.artifact,
        modifications=cand.modifications,
        config=OmegaConf.to_container(bench.cfg, resolve=True),
        names=(bench.teacher.name, label),
        run={"recipe": label, "baseline": True, "steps": 0, "build_seconds": seconds, **cand.facts},
    )
    report = assess(compare(bench, cand.model), bench.cfg.eval, run_dir, about)
    if cand.corrections:
        teacher, student = report["metrics"]["teacher"], report["metrics"]["student"]
        report["run"]["uncorrected"] = {k: student.get(k) for k in [*cand.corrections, "cost/compression_ratio"]}
        student.update(cand.corrections)
        if "cost/compression_ratio" in student:
            student["cost/compression_ratio"] = teacher["cost/bytes_memory"] / student["cost/bytes_memory"]
        report["comparison"] = compare_metrics(teacher, student)
    if cand.notes or cand.corrections:
        report["notes"] = [*report.get("notes", []), *cand.notes]
        write_report(report, run_dir)
    bench.teacher_metrics = bench.teacher_metrics or dict(report["metrics"]["teacher"])
    return report


def reuse_for_file(fp32_report: dict[str, Any], file: Path, run_dir: Path, label: str) -> dict[str, Any]:
    """The ``teacher_fp32`` report with the size on disk of ``file`` (the GGUF the teacher ships as).

    transformers dequantizes a GGUF on load, so the model that runs from it is the fp32 teacher: its
    quality and memory are that report's; only the size on disk (and the ratios built on it) change.
    """
    teacher = dict(fp32_report["metrics"]["teacher"])
    student = dict(fp32_report["metrics"]["student"])
    size = float(file.stat().st_size)
    student["cost/bytes_disk"] = size
    if "cost/bits_per_weight_disk" in student:
        student["cost/bits_per_weight_disk"] = 8 * size / max(student["cost/params"], 1)
    if "cost/bytes_fp32" in teacher:
        student["cost/ratio_vs_fp32_teacher"] = teacher["cost/bytes_fp32"] / size
    if "cost/bytes_shipped" in teacher:
        student["cost/ratio_vs_shipped_teacher"] = teacher["cost/bytes_shipped"] / size
    guard = fp32_report["degradation"]["settings"]
    report = build_report(teacher, student, [], {}, guard, (fp32_report["models"]["baseline"], label))
    report["config_hash"] = fp32_report["config_hash"]
    report["notes"] = [
        f"Not measured again: transformers dequantizes {file.name} to the fp32 teacher on load, so quality, "
        "memory and speed are teacher_fp32's (reused from its report); bytes on disk are the GGUF file's."
    ]
    report["run"] = {
        "recipe": label,
        "baseline": True,
        "steps": 0,
        "reused_from": "teacher_fp32",
        "artifact": str(file),
        "gguf_bytes": int(size),
    }
    write_report(report, run_dir)
    return report


def unavailable(bench: Bench, label: str, reason: str, run_dir: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """A report-like record of a baseline that cannot run here: the teacher side measured, the reason kept."""
    if bench.teacher_metrics is None:
        held = heldout_metrics(
            {"teacher": bench.teacher},
            bench.teacher,
            bench.datamodule.heldout_dataloader("test", bench.cfg.eval.get("max_batches")),
            bench.vocab_size,
            device=bench.device,
            eos_token_id=bench.teacher.tokenizer.eos_token_id,
        )
        bench.teacher_metrics = {f"heldout/{k}": v for k, v in held["teacher"].items() if k != "tokens"}
    guard = dict(bench.cfg.eval.get("guard") or {})
    config = OmegaConf.to_container(bench.cfg, resolve=True)
    report = build_report(bench.teacher_metrics, {}, [], config, guard, (bench.teacher.name, label))
    report["notes"] = [reason]
    report["run"] = {"recipe": label, "baseline": True, "unavailable": reason, **facts}
    write_report(report, run_dir)
    return report


@dataclass
class Layout:
    """Where a baseline's files go: its run folder (artifact, report, plots) and the kept report folder."""

    runs_root: Path
    out: Path

    def run_dir(self, label: str) -> Path:
        """The baseline's working folder: artifact/, report.json/md, plots, task files."""
        return self.runs_root / f"baseline_{label}"

    def kept(self, label: str) -> Path:
        """Where the report pair is copied for the headline table."""
        return self.out / f"baseline_{label}"

    def keep(self, label: str) -> Path:
        """Copy ``report.json`` and ``report.md`` of a finished baseline to :meth:`kept`."""
        dest = self.kept(label)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md"):
            shutil.copyfile(self.run_dir(label) / name, dest / name)
        return dest


def _fp32_source(bench: Bench, layout: Layout) -> Path:
    """An fp32 ``save_pretrained`` folder of the teacher (bitsandbytes quantizes while loading one)."""
    folder = layout.run_dir("teacher_fp32") / "artifact"
    if not (folder / "config.json").is_file():
        export_student(bench.teacher.model, bench.teacher.tokenizer, folder, verify=False)
    return folder


def run_baseline(bench: Bench, label: str, layout: Layout) -> dict[str, Any]:
    """Build, assess and write one baseline (``label`` in :data:`LABELS`); returns its report."""
    run_dir = layout.run_dir(label)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a forced or half-finished baseline starts over
    artifact = run_dir / "artifact"
    started = time.perf_counter()
    if label == "teacher_gguf":
        file = gguf_file(bench.cfg)
        if file is None:
            return unavailable(bench, label, "the teacher is not loaded from a GGUF file", run_dir, {})
        fp32 = layout.kept("teacher_fp32") / "report.json"
        if not fp32.is_file():
            run_baseline(bench, "teacher_fp32", layout)
            layout.keep("teacher_fp32")
        return reuse_for_file(json.loads(fp32.read_text()), file, run_dir, label)
    builders: dict[str, Callable[[], Candidate]] = {
        "teacher_fp32": lambda: teacher_fp32(bench, artifact),
        "teacher_bf16": lambda: teacher_bf16(bench, artifact),
        "prune_noheal": lambda: prune_noheal(bench, artifact),
        **{k: (lambda k=k: ptq(bench, artifact, ptq_spec(k))) for k in PTQ},
        **{k: (lambda k=k: ptq_gguf(bench, artifact, PTQ_GGUF[k])) for k in PTQ_GGUF},
        **{k: (lambda k=k: ptq_gguf(bench, artifact, "q4_0", PTQ_GGUF_MIX[k])) for k in PTQ_GGUF_MIX},
        **{k: (lambda k=k: ptq_gguf(bench, artifact, *PTQ_IMATRIX[k], weighted=True)) for k in PTQ_IMATRIX},
        **{k: (lambda k=k: ptq_imatrix_depth(bench, artifact, *PTQ_IMATRIX_DEPTH[k])) for k in PTQ_IMATRIX_DEPTH},
        **{k: (lambda k=k: ptq_depth(bench, artifact, *PTQ_DEPTH[k])) for k in PTQ_DEPTH},
        **{k: (lambda k=k: bnb(bench, artifact, k, _fp32_source(bench, layout))) for k in BNB},
    }
    if label in BNB:
        try:
            cand = builders[label]()
        except Exception as err:  # any failure of bitsandbytes here is the finding, recorded as such
            version = _bnb_version()
            reason = (
                f"does not run on this machine ({bench.device}): {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            )
            log.warning("%s: %s", label, reason)
            return unavailable(bench, label, reason, run_dir, {"bitsandbytes_version": version})
    else:
        cand = builders[label]()
    return measure(bench, label, cand, run_dir, time.perf_counter() - started)


def _bnb_version() -> str | None:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:  # not installed, or its import itself fails: either is the answer
        return None


def check_labels(labels: Sequence[str]) -> list[str]:
    """Refuse unknown baseline names before any model loads."""
    unknown = [x for x in labels if x not in LABELS]
    if unknown:
        raise config_error("baselines", unknown, f"choose from {', '.join(LABELS)}")
    return list(labels)


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every baseline ``cfg.baselines`` names without a kept report (all with ``cfg.force``); returns the reports."""
    labels = check_labels([cfg.baselines] if isinstance(cfg.baselines, str) else list(cfg.baselines))
    layout = Layout(Path(cfg.runs_root), Path(cfg.out))
    todo = [x for x in labels if cfg.force or not (layout.kept(x) / "report.json").is_file()]
    for label in sorted(set(labels) - set(todo)):
        print(f"{label}: report exists in {layout.kept(label)}, skipped (force=true reruns it)", flush=True)
    if not todo:
        return {}
    bench = prepare(cfg)
    reports = {}
    # teacher_fp32 first: teacher_gguf reuses it and bitsandbytes loads its folder.
    for label in sorted(todo, key=lambda x: (x != "teacher_fp32", labels.index(x))):
        started = time.perf_counter()
        print(f"{label}: building and assessing", flush=True)
        reports[label] = run_baseline(bench, label, layout)
        kept = layout.keep(label)
        print(f"{label}: done in {(time.perf_counter() - started) / 60:.1f} min, report in {kept}", flush=True)
    return reports


# --- the cliff curve -------------------------------------------------------------------------------------


def _curve_models(
    bench: Bench, widths: Sequence[str], group_size: int, root: Path
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The fp32 teacher and its PTQ copy at each width, each written to ``root/<width>``; and their rows."""
    export_student(bench.teacher.model, bench.teacher.tokenizer, root / "fp32", verify=False)
    rows = {"fp32": {"width": "fp32", "scheme": None, "quantized_bits_per_weight_disk": None}}
    models: dict[str, nn.Module] = {"fp32": bench.teacher.model}
    for width in widths:
        folder, scheme = root / width, CURVE[width]
        if scheme is None:
            model = copy.deepcopy(bench.teacher.model).to(torch.bfloat16).eval()
            export_student(model, bench.teacher.tokenizer, folder, verify=False)
            quantized_bits = None
        else:
            spec = schemes.make_spec(
                scheme, None if scheme == "int8_weight_only" else group_size, list(PTQ_SKIP), modules=PTQ_MODULES
            )
            model = schemes.ptq(copy.deepcopy(bench.teacher.model), spec)
            save_quantized(model, None, folder, spec, extra={"source": bench.teacher.name, "method": "ptq"})
            quantized_bits = json.loads((folder / META_FILE).read_text())["size"]["disk_bits_per_weight"]
        models[width] = model
        rows[width] = {"width": width, "scheme": scheme, "quantized_bits_per_weight_disk": quantized_bits}
    return models, rows


def _curve_sizes(
    root: Path, width: str, model: nn.Module, params: int, group_size: int, scheme: str | None
) -> dict[str, Any]:
    """The sizes of one width's artifact (``root/<width>``) against the fp32 one (``root/fp32``)."""
    weights = weight_file_bytes(root / width) or 0
    return {
        "group_size": group_size if scheme not in (None, "int8_weight_only") else None,
        "disk_bytes": disk_bytes(root / width),
        "weight_file_bytes": weights,
        "memory_bytes": memory_bytes(model),
        "bits_per_weight_disk": 8 * weights / params,
        "ratio_vs_fp32_disk": (weight_file_bytes(root / "fp32") or 0) / max(weights, 1),
    }


def ptq_curve(
    bench: Bench,
    widths: Sequence[str] = tuple(CURVE),
    group_size: int = 32,
    work_dir: str | Path | None = None,
    max_batches: int | None = None,
) -> list[dict[str, Any]]:
    """PTQ of the whole teacher (Linears and embedding) at each width: size and held-out quality, no tasks.

    Args:
        bench: the teacher and data (:func:`prepare`).
        widths: keys of :data:`CURVE` (``bf16``, ``int8``, ``int6``, ... ``int2``).
        group_size: the group of the grouped widths (int8 is per row).
        work_dir: where the artifacts are written (a temporary folder, removed after, when None).
        max_batches: held-out batches (default ``cfg.eval.max_batches``, the recipes' evaluation).

    Returns:
        One row per width, widest first, plus the fp32 reference: bytes on disk (artifact folder and weight
        files), bytes in memory, bits per weight as stored (all parameters; and quantized ones alone), the
        ratio to fp32 on disk, and held-out ``ppl``, ``kl_to_teacher`` and ``top1_agreement`` vs the fp32 teacher.

    """
    import tempfile

    unknown = [w for w in widths if w not in CURVE]
    if unknown:
        raise config_error("widths", unknown, f"choose from {', '.join(CURVE)}")
    root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ptq-curve-"))
    params = parameter_count(bench.teacher.model)
    try:
        models, rows = _curve_models(bench, widths, group_size, root)
        for width, row in rows.items():
            row.update(_curve_sizes(root, width, models[width], params, group_size, row["scheme"]))
        # One pass over the held-out batches: the teacher's logits are computed once for every width.
        cap = max_batches if max_batches is not None else bench.cfg.eval.get("max_batches")
        held = heldout_metrics(
            models,
            bench.teacher,
            bench.datamodule.heldout_dataloader("test", cap),
            bench.vocab_size,
            device=bench.device,
            eos_token_id=bench.teacher.tokenizer.eos_token_id,
        )
        for width, row in rows.items():
            row.update({k: held[width][k] for k in ("ppl", "kl_to_teacher", "top1_agreement", "tokens")})
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return list(rows.values())
