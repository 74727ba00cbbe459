"""The export step of a run (``train.py``): the plain student, each stage's compact form, torchao and GGUF files.

Every export is reloaded and checked against the student when written; the smallest on disk is the run's
deployable artifact, whose size the report gives.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.compress.quant.qat import QuantizedStudent
from distill.compress.quant.schemes import get_scheme
from distill.compress.stages import CompressionStage
from distill.cost import disk_bytes
from distill.export import gguf as gguf_export
from distill.export.hf import export_compact_forms, export_student, plain_model
from distill.export.torchao_hf import save_transformers_torchao
from distill.runtime.tracking import publish_student

log = logging.getLogger("distill")


def export_run(
    cfg: DictConfig, objects: dict[str, Any], stages: list[CompressionStage], loggers: list, formats: list[str]
) -> tuple[Path, Path]:
    """The plain export (shared/factorised/quantized weights made plain), then each stage's compact form.

    Returns the plain export and the deployable artifact: the smallest of the exports on disk (each one was
    reloaded and checked against the student when written), whose size the report gives.
    """
    teacher, student, module = objects["teacher"], objects["student"], objects["module"]
    plain = plain_model(student, stages)
    out = export_student(
        plain,
        module.tokenizer,  # the student's: the teacher's, or its own across tokenizers
        cfg.export.dir,
        verify=cfg.export.verify,
        metadata={
            "teacher": teacher.identity,
            "structure": module.structure,
            "global_step": objects["trainer"].global_step,
            # The splits it trained and was validated on: evaluate.py rebuilds exactly these (or refuses).
            "data": objects["datamodule"].split_facts() if hasattr(objects["datamodule"], "split_facts") else None,
        },
    )
    publish_student(loggers, out)  # W&B: the export as a model artifact
    log.info("exported the student to %s", out)
    compact = export_compact_forms(student, module.tokenizer, stages, cfg.paths.output_dir)
    for name, path in compact.items():
        log.info("%s wrote a compact export to %s", name, path)
    candidates = [out, *compact.values()]
    quant = next((a for s in stages for a in s.artifacts() if isinstance(a, QuantizedStudent)), None)
    if "torchao" in formats:
        if quant is None or not quant.converted:
            raise RuntimeError(
                "export.formats has torchao but QAT never converted the student (start_step not reached)"
            )
        folder = save_transformers_torchao(
            student, module.tokenizer, Path(cfg.paths.output_dir) / "student_torchao", quant.spec
        )
        log.info("wrote the transformers torchao export %s (loads with plain from_pretrained)", folder)
        candidates.append(folder)  # checked to reload with identical logits
    if "gguf" in formats:
        check = _export_gguf(cfg, plain, module.tokenizer, quant)
        objects["gguf"] = check
        # The report measures the student in memory, so the GGUF file is the artifact only when it computes
        # the same model (a student trained on its llama.cpp grid), not when writing it rounded the weights.
        if check is not None and check.drift_max_abs_logit <= gguf_export.RELOAD_ATOL:
            candidates.append(check.file.parent)
    artifact = min(candidates, key=lambda folder: disk_bytes(folder) or 0)
    return out, artifact


def _export_gguf(
    cfg: DictConfig, plain: Any, tokenizer: Any, quant: QuantizedStudent | None
) -> gguf_export.GGUFCheck | None:
    """Write the GGUF file (``export.formats`` has ``gguf``); returns what its verification measured.

    ``quant``: what QAT trained, when it did; its per-weight llama.cpp types are written as trained.
    """
    trained = quant.gguf_types if quant is not None else {}
    stored = quant.gguf_blocks if quant is not None else {}
    gguf_type = cfg.export.gguf_type
    if gguf_type == "auto":  # the scheme's type (a mix of types names its file after the scheme's)
        gguf_type = get_scheme(quant.spec.scheme).gguf if trained else "f16"
    pre = cfg.export.gguf_pre
    if pre == "auto":
        pre = gguf_export.teacher_pre(cfg.teacher)
    if not trained and quant is not None and quant.spec.scheme.startswith("gguf_"):
        log.warning(
            "QAT never converted the student (start_step not reached): the GGUF file rounds it to %s", gguf_type
        )
    if not cfg.export.verify:
        file = gguf_export.write_gguf(plain, tokenizer, cfg.export.gguf_dir, gguf_type, trained, pre=pre, stored=stored)
        log.info("wrote the GGUF export %s (not verified: export.verify=false)", file)
        return None
    # Checked before the folder is published: a file that fails leaves the previous one in place.
    check = gguf_export.export_gguf(plain, tokenizer, cfg.export.gguf_dir, gguf_type, trained, pre=pre, stored=stored)
    file = check.file
    log.info(
        "wrote the GGUF export %s (%s, %.2f MiB): reloads as written; against the student max |Δlogit| %.3g, "
        "top-1 agreement %.3f on a random probe",
        file,
        gguf_type,
        check.bytes / 2**20,
        check.drift_max_abs_logit,
        check.drift_top1_agreement,
    )
    return check


def gguf_facts(check: gguf_export.GGUFCheck | None) -> dict[str, Any]:
    """What the GGUF file's reload measured (docs/deploy.md), for the report's run facts; empty without one."""
    if check is None:
        return {}
    return {
        "gguf_file": str(check.file),
        "gguf_bytes": check.bytes,
        "gguf_max_abs_logit_vs_student": check.drift_max_abs_logit,
        "gguf_top1_vs_student_probe": check.drift_top1_agreement,
    }
