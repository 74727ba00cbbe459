"""Which forms a run exports (``export.formats``), checked before anything loads."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from distill.compress.stages import registry
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
    raw = _plain(export.get("formats", ["hf"]))
    formats = list(raw) if isinstance(raw, list | tuple) else raw
    if not isinstance(formats, list) or any(f not in FORMATS for f in formats) or "hf" not in formats:
        raise config_error(
            "export.formats",
            formats,
            f"give a list with hf and any of {', '.join(FORMATS[1:])}, e.g. export.formats=[hf,gguf] "
            "(the plain folder is always written)",
        )
    if "gguf" in formats and export.get("gguf_type", "auto") != "auto":
        check_type(export.gguf_type)
    callbacks = (_plain(callbacks) or {}) if callbacks is not None else None
    if callbacks is not None:
        _check_callbacks(formats, callbacks)
    return formats


def _check_callbacks(formats: list[str], callbacks: dict[str, Any]) -> None:
    """Refuse callback settings whose student an export format cannot hold, before anything trains."""
    stages = registry()
    for name, stage in stages.items():
        if callbacks.get(name) and stage.check_formats is not None:
            stage.check_formats(callbacks[name], formats)
    if "torchao" in formats:
        torchao = (s.torchao_scheme(callbacks[n]) for n, s in stages.items() if s.torchao_scheme and callbacks.get(n))
        if not any(torchao):
            raise config_error(
                "export.formats",
                formats,
                "torchao writes a student quantized by torchao's QAT; add callbacks=qat with an int* scheme "
                "(a gguf_* scheme ships as export.formats=[hf,gguf])",
            )
        for name in (n for n, s in stages.items() if s.rebuilds_linears and callbacks.get(n)):
            raise config_error(
                "export.formats",
                formats,
                f"torchao cannot hold a student with callbacks.{name} (no transformers architecture for "
                "factorised or shared layers); drop torchao from export.formats",
            )
