"""``trainer_extras.compile_rounding``: the llama.cpp grids' fake quantizers run through ``torch.compile`` (inductor).

Eager, :func:`distill.compress.quant.gguf_grid.fake_quantize` makes several passes over weight-sized temporaries per
weight and step; inductor fuses most of them into one loop. The values must stay those of the eager rounding bit
for bit, since the GGUF file stores them: inductor by default drops the fp32 → fp16 → fp32 round trip that gives
each block's scale its stored precision, which moves nearly every value by up to one fp16 step of the scale.
``emulate_precision_casts`` keeps those casts in the compiled graphs (with it the compiled and eager values are
equal, ``tests/compress/quant/test_compile_rounding.py``); it is passed per compiled module, not set globally.

The quantizers do not exist yet when ``train.py`` applies the student switches (QAT inserts them in its setup, or at
``start_step``), so a forward pre-hook on the student's body compiles each one it finds not compiled yet.

``auto`` (the default) compiles when it pays: when the student's rounded weights number at least
:data:`AUTO_MIN_WEIGHTS` (the compilation costs tens of seconds once; on a small student the eager rounding is a
small part of the step) and inductor has a compiler for the device (a C++ compiler on CPU, triton on CUDA). Which
way it went is logged once, with the reason.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from distill.compress.quant.gguf_grid import GGUFBlockFakeQuantizer
from distill.compress.quant.row_embedding import RowRoundedEmbedding

log = logging.getLogger("distill")

INDUCTOR_OPTIONS = {"emulate_precision_casts": True}  # keep the fp16 rounding of the scales (see above)
# ``auto``: compile from this many rounded weights. On the embedded default (135M) the compiled rounding takes
# about a third of the eager one's time in the step (docs/performance.md); a 2-layer test student does not pay
# for its compilation.
AUTO_MIN_WEIGHTS = 20_000_000


def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # inductor raises its own error types when no C++ compiler is found
        return f"inductor finds no C++ compiler ({err})"
    return None


def auto_decision(model: nn.Module) -> tuple[bool, str]:
    """``auto``: whether to compile ``model``'s quantizers, and the one-line reason."""
    weights = {id(w): w for _, w in _quantized_weights(model)}  # a tied head's weight counts once
    total = sum(w.numel() for w in weights.values())
    if total < AUTO_MIN_WEIGHTS:
        return False, f"{total:,} rounded weights, under {AUTO_MIN_WEIGHTS:,}: the compilation would not pay"
    device = next((w.device for w in weights.values()), torch.device("cpu"))
    missing = compiler_missing(device)
    if missing is not None:
        return False, f"{missing}; set trainer_extras.compile_rounding=false to silence this"
    return True, f"{total:,} rounded weights"


def compile_quantizers(model: nn.Module, done: weakref.WeakSet | None = None) -> int:
    """Compile, in place, each llama.cpp block quantizer of ``model`` not in ``done``; returns how many were.

    Dynamo keeps one graph per grid, weight shape and grad mode, and falls back to eager beyond its recompile
    limit (8 by default); the limit is raised to what this model's quantizers need, so none of them falls back.
    """
    done = weakref.WeakSet() if done is None else done
    fresh = [m for m in model.modules() if isinstance(m, GGUFBlockFakeQuantizer) and m not in done]
    if not fresh:
        return 0
    graphs = 2 * len({(m.kind, tuple(w.shape)) for m, w in _quantized_weights(model)})  # training and no_grad
    # A row-rounded embedding rounds a batch's rows: a few more shapes, until dynamo makes the batch dims dynamic.
    graphs += 4 * sum(isinstance(m, RowRoundedEmbedding) for m in model.modules())
    limit = torch._dynamo.config.recompile_limit
    if graphs > limit:
        torch._dynamo.config.recompile_limit = graphs
    for module in fresh:
        module.compile(options=INDUCTOR_OPTIONS)
        done.add(module)
    log.info("trainer_extras.compile_rounding: %d llama.cpp grid quantizers compiled", len(fresh))
    return len(fresh)


def _quantized_weights(model: nn.Module) -> list[tuple[GGUFBlockFakeQuantizer, torch.Tensor]]:
    return [
        (m.weight_fake_quantizer, m.weight)
        for m in model.modules()
        if isinstance(getattr(m, "weight_fake_quantizer", None), GGUFBlockFakeQuantizer)
    ]


def compile_rounding_on_forward(student: nn.Module, mode: bool | str = True) -> RemovableHandle:
    """Compile the student's llama.cpp quantizers at each forward that finds new ones (QAT inserts them later).

    The hook sits on the student's body (``base_model``), which both the chunked loss and a plain forward call;
    it compiles every quantizer of the student, the output layer's included. ``mode="auto"`` decides once, at the
    first forward that finds quantizers (:func:`auto_decision`), and logs the decision.
    """
    done: weakref.WeakSet = weakref.WeakSet()
    decided: list[bool] = [] if mode == "auto" else [True]

    def hook(_module: nn.Module, _args: tuple) -> None:
        if not decided:
            if not _quantized_weights(student):
                return
            compile_now, reason = auto_decision(student)
            decided.append(compile_now)
            log.info("trainer_extras.compile_rounding=auto: %s (%s)", "compiled" if compile_now else "eager", reason)
        if decided[0]:
            compile_quantizers(student, done)

    body = getattr(student, "base_model", student)
    return body.register_forward_pre_hook(hook)
