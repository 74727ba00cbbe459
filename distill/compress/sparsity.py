"""Weight sparsity: which weights of the student's decoder linears to zero, by magnitude or by Wanda.

The maths of ``callbacks=sparsity`` (``callbacks/sparsity.py``). Masks zero weights in place; the model keeps
its dense shapes, so every other stage, the checkpoint and the plain Hugging Face export stay as they are.

* Importance: ``magnitude`` (|w|) or ``wanda`` (|w| · ‖x_j‖₂, Sun et al. 2023: the weight times the L2 norm
  of its input channel over calibration tokens). torchao ships a ``WandaSparsifier``, but it scores
  |w| · ‖x_j‖₂² (its observer accumulates squared norms and never takes the root) and compares across the
  whole matrix, while the paper compares within each output row; it also works through parametrizations and
  observers that would change the student's module structure under QAT and in checkpoints. So the score is
  computed here (a few lines) and torchao's ``mask_creator`` picks the N:M blocks.
* Unstructured: the lowest-scoring ``level`` of each output row (``compare=row``, Wanda's choice) or of the
  whole matrix (``compare=layer``).
* ``2:4``: in every block of 4 consecutive input weights, the 2 lowest-scoring go (the pattern sparse tensor
  cores run). Progressively, the schedule's level ``s`` in [0, 0.5] prunes the cheapest ``2s`` of the blocks
  (by the score they lose), so the last step leaves every block 2:4.
* Schedule: cubic (Zhu & Gupta 2017) or linear from ``start_step`` to ``end_step``; masks only grow, since a
  pruned weight scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.compress.stages import Stage, register

PATTERNS = (None, "2:4")
IMPORTANCES = ("magnitude", "wanda")


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The student's decoder-layer linears by name (embeddings and the output layer are left dense)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            out[name] = module
    return out


def level_at(step: int, start: int, end: int, final: float, schedule: str = "cubic") -> float:
    """The sparsity level reached at ``step``: 0 before ``start``, ``final`` from ``end`` on."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final * (1 - (1 - progress) ** 3) if schedule == "cubic" else final * progress


def unstructured_mask(score: Tensor, level: float, compare: str = "row") -> Tensor:
    """Keep-mask (bool) that drops the lowest-scoring ``level`` of each row (``row``) or of the matrix (``layer``)."""
    flat = score.reshape(score.shape[0], -1) if compare == "row" else score.reshape(1, -1)
    drop = int(flat.shape[1] * level)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        keep.scatter_(1, flat.argsort(dim=1, stable=True)[:, :drop], False)
    return keep.reshape(score.shape)


def semi_structured_mask(score: Tensor, level: float, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask for N:M sparsity (``n`` kept of every ``m`` input weights) on the cheapest ``level·m/(m-n)`` blocks.

    At ``level = (m-n)/m`` (0.5 for 2:4) every block is N:M; below it, the blocks that lose the least score
    are pruned first.
    """
    from torchao.sparsity.utils import mask_creator

    if score.shape[-1] % m:
        raise ValueError(
            f"a {m}-wide block pattern needs the input width to be a multiple of {m}: {tuple(score.shape)}"
        )
    nm = mask_creator(score.float(), N=n, M=m).bool()  # n kept of every m, by score (torchao)
    blocks = score.reshape(-1, m)
    lost = (blocks * ~nm.reshape(-1, m)).sum(1)  # what each block would lose
    share = min(1.0, level * m / (m - n))
    count = round(blocks.shape[0] * share)
    pruned = torch.zeros(blocks.shape[0], dtype=torch.bool, device=score.device)
    pruned[lost.argsort(stable=True)[:count]] = True
    keep = torch.where(pruned[:, None], nm.reshape(-1, m), torch.ones_like(nm.reshape(-1, m)))
    return keep.reshape(score.shape)


class InputNorms:
    """Squared L2 norm of each input channel of the given linears, summed over the tokens that pass (Wanda)."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.sums: dict[str, Tensor] = {}
        self.collecting = False
        self._hooks = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not (self.collecting and module.training):  # training batches only, never validation's
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            total = x.pow(2).sum(0)
            self.sums[name] = self.sums[name] + total if name in self.sums else total

        return record

    def norms(self, name: str) -> Tensor:
        """‖x_j‖₂ per input channel of ``name`` over everything collected."""
        if name not in self.sums:
            raise RuntimeError(f"no activations were collected for {name}: Wanda needs calib_batches >= 1")
        return self.sums[name].sqrt()

    def reset(self) -> None:
        """Forget what was collected (after each pruning step)."""
        self.sums.clear()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def scores(weight: Tensor, importance: str, norms: Tensor | None = None) -> Tensor:
    """|w| (magnitude) or |w|·‖x_j‖₂ (Wanda) for every weight."""
    magnitude = weight.detach().abs().float()
    if importance == "magnitude":
        return magnitude
    assert norms is not None
    return magnitude * norms.to(magnitude.device)[None, :]


def layer_stats(weights: Iterable[tuple[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Per linear: the share of zero weights and the count of nonzero ones (what the report lists)."""
    out = {}
    for name, w in weights:
        nonzero = int(torch.count_nonzero(w))
        out[name] = {"sparsity": round(1 - nonzero / w.numel(), 6), "nonzeros": nonzero, "weights": w.numel()}
    return out


def overall(stats: dict[str, dict[str, float]]) -> float:
    """The share of zero weights over all the listed linears."""
    total = sum(s["weights"] for s in stats.values())
    return 1 - sum(s["nonzeros"] for s in stats.values()) / total if total else 0.0


def summarize_sparsity(config: Mapping[str, Any], _state: dict) -> str:
    """One weight-sparsity step; the last lists each linear's share of zeros and its nonzero count."""
    text = f"step {config.get('step', '?')}: {config.get('zeros', 0):.1%} of the decoder linears' weights zero"
    layers = config.get("layers") or {}
    if layers:
        shares = [v["sparsity"] for v in layers.values()]
        nonzeros = sum(v["nonzeros"] for v in layers.values())
        text += (
            f" ({config.get('pattern', '?')}, {config.get('importance', '?')}; per linear {min(shares):.1%}–"
            f"{max(shares):.1%}, {nonzeros:,} nonzeros in {len(layers)} linears: report.json lists each). "
            "The export stores the zeros densely: dense kernels, every CPU run included, gain no speed from them"
        )
    return text


# Weight sparsity changes no shape: the zeros are in the checkpoint's weights, the masks in the callback's state.
SPARSITY = register(
    Stage(
        "sparsity",
        40,
        lambda _student, _spec: None,
        summarize=summarize_sparsity,
        refused_under={
            "fsdp": "it scores and masks whole weight matrices, and each rank holds only a shard of each",
            "zero3": "it scores and masks whole weight matrices, and each rank holds only a partition of each",
        },
    )
)
