"""Which forms a run exports (``export.formats``), checked before anything loads."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from distill.config import config_error
from distill.export.gguf import check_type

# hf: the plain transformers folder (always); gguf: a llama.cpp file (docs/deploy.md); torchao: the quantized
# student as a transformers TorchAoConfig folder (distill/export/torchao_hf.py).
FORMATS = ("hf", "gguf", "torchao")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def check_formats(export: Any, callbacks: Any = None) -> list[str]:
    """Validate ``export.formats`` against the other settings; returns the formats.

    ``hf`` is required: evaluation, W&B publishing and the compact exports read the plain folder. ``gguf``
    checks ``export.gguf_type``; ``torchao`` needs a QAT callback on a torchao grid and no low-rank layers,
    which transformers' architectures do not have.
    """
    formats = list(_plain(export.get("formats", ["hf"])) or [])
    if any(f not in FORMATS for f in formats) or "hf" not in formats:
        raise config_error(
            "export.formats",
            formats,
            f"list the forms to write, hf first: any of {', '.join(FORMATS)} (the plain folder is always written)",
        )
    if "gguf" in formats and export.get("gguf_type", "auto") != "auto":
        check_type(export.gguf_type)
    if "torchao" in formats and callbacks is not None:
        callbacks = _plain(callbacks) or {}
        qat = callbacks.get("qat") or {}
        if not qat or str(qat.get("scheme", "")).startswith("gguf_"):
            raise config_error(
                "export.formats",
                formats,
                "torchao writes a student quantized by torchao's QAT; add callbacks=qat with an int* scheme "
                "(a gguf_* scheme ships as export.formats=[hf,gguf])",
            )
        if callbacks.get("lowrank"):
            raise config_error(
                "export.formats", formats, "a low-rank student has no transformers architecture; drop torchao"
            )
    return formats
