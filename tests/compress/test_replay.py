"""Replaying a structure log (distill.compress.replay) rebuilds the compressed student's exact structure."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.lowrank import factorize
from distill.compress.prune.selection import select
from distill.compress.prune.surgery import apply_spec, shapes
from distill.compress.quant import qat
from distill.compress.quant.schemes import make_spec
from distill.compress.replay import replay
from distill.compress.share import apply_sharing, sharing_spec
from distill.compress.sparsity import unstructured_mask
from distill.compress.stages import stage_names
from distill.config import ConfigError
from tests.compress.prune.helpers import make_batch, make_student, prepare, score


def compress(student: nn.Module) -> list[dict[str, Any]]:
    """Prune, share, factorise, sparsify and fake-quantize ``student`` in place as the callbacks do; returns the log.

    Each spec is built the way its callback builds the one it records (``callbacks/<stage>.py``).
    """
    cb = ProgressiveStructuredPruning(heads=2, channels=0.5, layers=2, importance="activation", end_step=1)
    prepare(cb, student)
    score(cb.scores, student)
    pruned = select(cb.scores, student, cb.sizes_at(1))
    apply_spec(student, pruned)
    # Two layers left: tie them, relaxed by LoRA on q_proj only, so the MLP projections stay plain linears.
    shared = sharing_spec(2, "all", None, lora_rank=2, lora_alpha=4.0, lora_targets=["q_proj"])
    apply_sharing(student, shared)
    # Both layers' down_proj are one tied weight: the factorisation keeps them one pair of factors.
    ranks = {"model.layers.0.mlp.down_proj": 4, "model.layers.1.mlp.down_proj": 4}
    factorize(student, ranks)
    # Weight sparsity: half of a plain projection zeroed by magnitude; nothing to rebuild, the zeros are weights.
    gate = student.model.layers[0].mlp.gate_proj.weight
    with torch.no_grad():
        gate.mul_(unstructured_mask(gate.abs(), 0.5))
    sparse = {"step": 1, "level": 0.5, "zeros": 0.5}
    quant = make_spec("int8_weight_only", None, None)
    qat.prepare(student, quant)
    return [
        {"kind": "prune", "spec": pruned},
        {"kind": "share", "spec": shared},
        {"kind": "lowrank", "spec": {"ranks": ranks}},
        {"kind": "sparsity", "spec": sparse},
        {"kind": "qat", "spec": quant.to_dict()},
    ]


def ties(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one tensor, grouped (what sharing and tied factors made)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def test_replayed_log_rebuilds_the_compressed_structure(tiny_teacher):
    compressed = make_student(tiny_teacher).eval()
    log = compress(compressed)
    assert [c["kind"] for c in log] == list(stage_names())  # every registered kind is exercised
    # Checkpoints and distill.json carry the log as plain data: replay what survives that trip.
    log = json.loads(json.dumps(log))

    fresh = make_student(tiny_teacher, seed=1).eval()
    before = {k: v.shape for k, v in fresh.state_dict().items()}
    replay(fresh, log)
    want = {k: v.shape for k, v in compressed.state_dict().items()}
    got = {k: v.shape for k, v in fresh.state_dict().items()}
    assert got != before  # the replay changed the structure...
    assert got == want  # ...into exactly the compressed one: same keys, same shapes
    assert shapes(fresh) == shapes(compressed)
    assert ties(fresh) == ties(compressed) and ties(fresh)  # the layer ties and the tied factors came back

    # The checkpoint's weights then fit with nothing missing or left over, and give the same outputs.
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, compressed(input_ids=ids).logits, rtol=0, atol=0)


def test_unknown_kind_is_refused_by_name(tiny_teacher):
    student = make_student(tiny_teacher)
    before = {k: v.shape for k, v in student.state_dict().items()}
    with pytest.raises(ConfigError, match=r"checkpoint structure kind='sparsify': .*cannot rebuild a 'sparsify'"):
        replay(student, [{"kind": "sparsify", "spec": {}}])
    assert {k: v.shape for k, v in student.state_dict().items()} == before  # refused before changing anything
