"""What the pruning tests share: a small student, a batch, scoring without a trainer, and the masked reference."""

from __future__ import annotations

import copy

import torch

from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.prune.importance import ImportanceAccumulator
from distill.compress.prune.surgery import shapes
from students import scratch

# A 3-layer student with 4 query heads in 2 KV groups and 64 MLP channels: every pruning dimension has room.
STUDENT = ("student.num_layers=3", "student.num_heads=4", "student.num_kv_heads=2", "student.intermediate_size=64")
QUIET = ("eval.enabled=false", "trainer.limit_val_batches=0", "trainer.val_check_interval=100")
PRUNE = (
    "callbacks=prune",
    *STUDENT,
    "callbacks.prune.heads=2",
    "callbacks.prune.channels=0.5",
    "callbacks.prune.layers=2",
    "callbacks.prune.end_step=8",
    "callbacks.prune.every_n_steps=2",
    "callbacks.prune.calib_batches=2",
    "trainer.log_every_n_steps=1",
)


def make_student(teacher, seed: int = 0):
    """The :data:`STUDENT` shape (width 32) built from scratch on ``teacher``'s vocabulary, seeded."""
    torch.manual_seed(seed)
    return scratch.build(teacher, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)


def make_batch(n: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """``n`` random sequences of ``seq`` token ids below 512 (the tiny teacher's vocabulary), seeded."""
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


def prepare(cb: ProgressiveStructuredPruning, student) -> None:
    """What setup does, without a trainer."""
    cb.original = shapes(student)
    cb.final = cb.plan.final_sizes(cb.original)


def score(acc: ImportanceAccumulator, student, batches: int = 2) -> None:
    """Collect ``acc``'s importance over ``batches`` seeded batches, as calibration does."""
    acc.attach(student)
    acc.collecting = True
    for b in range(batches):
        ids = make_batch(seed=b)
        out = student(input_ids=ids, labels=ids)
        if acc.method == "taylor":
            student.zero_grad()
            out.loss.backward()
            acc.accumulate_grads(student)
    acc.collecting = False
    acc.detach()


def masked_copy(student, spec):
    """The original model with the units ``spec`` removes zeroed at their output projection."""
    masked = copy.deepcopy(student)
    d = masked.model.layers[0].self_attn.head_dim
    kept_layers = spec["layers"] or list(range(len(masked.model.layers)))
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            if i not in kept_layers:  # a skipped layer: its residual branches add zero
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            j = kept_layers.index(i)
            n_heads = layer.self_attn.o_proj.in_features // d
            for h in set(range(n_heads)) - set(spec["q_heads"][j] if spec["q_heads"] else range(n_heads)):
                layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
            n_ch = layer.mlp.down_proj.in_features
            for c in set(range(n_ch)) - set(spec["channels"][j] if spec["channels"] else range(n_ch)):
                layer.mlp.down_proj.weight[:, c] = 0
    return masked
