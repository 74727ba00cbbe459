"""The byte budget's entry points (``callbacks.qat.target_ratio`` / ``target_bytes``), by the scheme it acts on.

On a ``gguf_*`` scheme the budget chooses a llama.cpp type per matrix for the GGUF file
(:mod:`~distill.compress.quant.type_map`); on a weight-only torchao scheme, a torchao grid per matrix for the compact
export (:mod:`~distill.compress.quant.grid_budget`). The QAT callback calls these two and no other.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from distill.compress.quant.grid_budget import resolve_grids, spec_on_grid_budget
from distill.compress.quant.schemes import QuantSpec, get_scheme
from distill.compress.quant.type_map import (
    ByteTarget,
    TypeMap,
    check_probe,
    check_target,
    parse_budget,
    spec_on_budget,
)
from distill.config import config_error

GRIDS_FIELD = "callbacks.qat.budget_grids"


def check_budget(
    spec: QuantSpec,
    target_ratio: object,
    gguf_types: object,
    target_bytes: object,
    grids: object,
    probe: object = None,
) -> ByteTarget | None:
    """The run's budget, or None: llama.cpp's :func:`~distill.compress.quant.type_map.check_target`, or torchao's.

    A torchao budget needs a weight-only scheme (whose grid probes each matrix) and no hand-made
    ``module_schemes``; ``grids`` (``budget_grids``) are its candidates, and need a budget. ``probe``
    (``budget_probe``) null means the family's default: on for torchao's grids (unprobed, the tied table gets two
    bits: ``bench/results/grid_budget.md``), off for llama.cpp's types (``type_map.check_target``).
    """
    if get_scheme(spec.scheme).gguf is not None:
        if grids is not None:
            why = "are torchao's grids; a llama.cpp scheme's budget chooses among llama.cpp's types (leave it null)"
            raise config_error(GRIDS_FIELD, grids, why)
        return check_target(spec, target_ratio, gguf_types, target_bytes, probe)
    parsed = parse_budget(target_ratio, target_bytes)
    check_probe(probe, parsed is not None)
    if parsed is None:
        if grids is not None:
            why = "chooses grids for a byte budget; give callbacks.qat.target_bytes or target_ratio too"
            raise config_error(GRIDS_FIELD, grids, why)
        return None
    field, value, target = parsed
    if spec.module_schemes:
        why = "and callbacks.qat.module_schemes both choose the grids; give one (module_schemes=null)"
        raise config_error(field, value, why)
    if get_scheme(spec.scheme).act_bits is not None:
        why = f"chooses among weight-only grids; {spec.scheme} quantizes activations (use int4_weight_only or similar)"
        raise config_error(field, value, why)
    return dataclasses.replace(target, grids=resolve_grids(grids, GRIDS_FIELD), probe=probe is not False)


def shared_spec_on_budget(
    model: nn.Module,
    spec: QuantSpec,
    datamodule: object,
    target: ByteTarget,
    tokenizer: object,
    batches: int,
) -> tuple[QuantSpec, TypeMap]:
    """``spec`` with the budget's map (llama.cpp types or torchao grids) on the training split, chosen on rank 0.

    FSDP (scale_out.md): ranks > 0 may hold the student empty before wrapping, and every rank must train on one
    map (one process: computed here).
    """
    from distill.runtime.ranks import computed_on_rank_zero

    train_set, block_size = datamodule.train_set, datamodule.block_size  # type: ignore[attr-defined]
    choose = spec_on_budget if get_scheme(spec.scheme).gguf is not None else spec_on_grid_budget
    return computed_on_rank_zero(lambda: choose(model, spec, train_set, block_size, target, tokenizer, batches))
