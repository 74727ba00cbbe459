"""Low-rank factorization of linear layers by truncated SVD, optionally whitened by calibration inputs.

A linear W (d_out × d_in) becomes ``up(down(x))`` with factors of rank r (:class:`LowRankLinear`), cutting
its parameters from d_out·d_in to r·(d_out + d_in). The rank is chosen per layer by an energy threshold,
by one global parameter budget, or fixed (:func:`plan`). With calibration batches the truncation is done on
``W·L`` where ``L·Lᵀ`` is the Gram matrix of the layer's real inputs (SVD-LLM, in the spirit of ASVD), so
the discarded part is the one that matters least on the data rather than on the weights alone.

Hand-written because no maintained library does data-whitened SVD factorization of transformers linears
with a parameter budget (torch gives the SVD and the Cholesky factor; the rest is a few lines). The
Lightning side is ``callbacks/lowrank.py``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.compress.describe import spread
from distill.compress.share import lora_layers
from distill.compress.stages import Stage, register
from distill.config import config_error
from distill.loaders.load_compact import LowRankLinear, set_module

FIELD = "callbacks.lowrank"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- the maths ----------------------------------------------------------------------------------------
@torch.no_grad()
def whitened_svd(
    weight: Tensor, gram: Tensor | None = None, damping: float = 0.01
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """SVD of ``weight`` (float64), or of ``weight·L`` with L·Lᵀ = gram + λI when ``gram`` is given.

    Returns:
        ``(u, s, vh, L)``; ``L`` is None without ``gram``.

    """
    w = weight.detach().double()
    chol = None
    if gram is not None:
        g = gram.double()
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        chol = torch.linalg.cholesky(g + damping * g.diagonal().mean().clamp_min(1e-12) * eye)
        w = w @ chol
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh, chol


def truncate(svd: tuple[Tensor, Tensor, Tensor, Tensor | None], rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Factors ``(up, down)`` of rank ``rank`` from :func:`whitened_svd`; √σ goes to each side."""
    u, s, vh, chol = svd
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if chol is not None:
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)  # down · L⁻¹
    return up.to(dtype), down.to(dtype)


def svd_factors(
    weight: Tensor, rank: int | None = None, gram: Tensor | None = None, damping: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of ``weight`` (d_out × d_in), optionally whitened by the inputs' Gram matrix.

    Without ``gram``, ``up @ down`` is the best rank-r approximation in Frobenius norm (Eckart–Young):
    the squared error is the sum of the discarded squared singular values. With ``gram`` = XᵀX of the
    inputs, it minimises ‖(W − up·down)·Xᵀ‖ instead: SVD of W·L with L·Lᵀ = XᵀX + λI, then ``down``
    gets the L⁻¹ (SVD-LLM).

    Args:
        weight: the dense weight.
        rank: kept singular values (None: all).
        gram: d_in × d_in Gram matrix of calibration inputs, or None for plain SVD.
        damping: λ as a fraction of the mean diagonal of ``gram`` (keeps the Cholesky factor well posed
            when there are fewer calibration tokens than input features).

    Returns:
        ``(up, down, singular_values)``: d_out × r, r × d_in (in ``weight``'s dtype) and all singular values
        (float64) of W or W·L, whose squares measure the energy the rank keeps.

    """
    svd = whitened_svd(weight, gram, damping)
    up, down = truncate(svd, svd[1].numel() if rank is None else rank, weight.dtype)
    return up, down, svd[1]


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest rank whose squared singular values hold at least ``energy`` of the total."""
    sq = singular_values.double() ** 2
    cum = torch.cumsum(sq, 0) / sq.sum().clamp_min(1e-300)
    return min(int((cum < energy - 1e-12).sum()) + 1, singular_values.numel())


def ranks_for_budget(spectra: dict[str, tuple[Tensor, int, int]], budget: float) -> dict[str, int]:
    """Ranks for several layers that keep at most ``budget`` of their dense parameters in total.

    Greedy over all singular values of all layers, best first by the share of its layer's energy per
    parameter it costs (d_in + d_out); every layer keeps at least rank 1 and stays below the rank at
    which the factors would cost as much as the dense weight, so every layer is factorised.

    Args:
        spectra: name → (singular values, d_in, d_out).
        budget: fraction of Σ d_in·d_out to keep.

    """
    total = sum(d_in * d_out for _, d_in, d_out in spectra.values())
    allowed = budget * total
    ranks = {name: 1 for name in spectra}
    used = sum(d_in + d_out for _, d_in, d_out in spectra.values())
    candidates = []
    for name, (s, d_in, d_out) in spectra.items():
        sq = s.double() ** 2
        share = sq / sq.sum().clamp_min(1e-300) / (d_in + d_out)
        cap = min(s.numel(), max_useful_rank(d_in, d_out))
        candidates += [(float(share[i]), name, i) for i in range(1, cap)]
    # Within a layer the scores fall with i, so taking the best first always extends a prefix.
    for _, name, _i in sorted(candidates, key=lambda c: -c[0]):
        _, d_in, d_out = spectra[name]
        if used + d_in + d_out > allowed:
            continue
        ranks[name] += 1
        used += d_in + d_out
    return ranks


# -- the model surgery --------------------------------------------------------------------------------
def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` modules whose last name component is in ``targets``.

    Projections that carry a LoRA relaxation (peft) stay dense: their base weight is shared across
    layers and the delta is defined on it.
    """
    lora = tuple(f"{n}." for n in lora_layers(model))
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in targets and not name.startswith(lora)
    }


def _tied(modules: dict[str, nn.Linear]) -> dict[int, list[str]]:
    by_weight: dict[int, list[str]] = {}
    for name, m in modules.items():
        by_weight.setdefault(id(m.weight), []).append(name)
    return by_weight


@torch.no_grad()
def factorize(model: nn.Module, ranks: dict[str, int], factors: dict[str, tuple[Tensor, Tensor]] | None = None) -> None:
    """Replace each named linear by a :class:`LowRankLinear` of the given rank.

    Linears that share one weight (cross-layer sharing) get one pair of factor Parameters, used by
    every member, so the tie survives factorization.

    Args:
        model: the model to change in place.
        ranks: module name → rank.
        factors: module name → (up, down) values; None leaves fresh values (replay: the checkpoint fills them).

    """
    modules = {}
    for name in ranks:
        m = model.get_submodule(name)
        if type(m) is not nn.Linear:
            raise config_error(FIELD, name, "only plain nn.Linear layers can be factorised")
        modules[name] = m
    for names in _tied(modules).values():
        first = modules[names[0]]
        r = ranks[names[0]]
        low = LowRankLinear(first.in_features, first.out_features, r, first.bias is not None)
        low.to(device=first.weight.device, dtype=first.weight.dtype)
        if factors is not None:
            up, down = factors[names[0]]
            low.up.weight.copy_(up)
            low.down.weight.copy_(down)
        if first.bias is not None:
            low.up.bias = first.bias  # the bias object (shared or not) carries over untouched
        for name in names:
            member = LowRankLinear(first.in_features, first.out_features, r, first.bias is not None)
            member.down.weight, member.up.weight, member.up.bias = low.down.weight, low.up.weight, low.up.bias
            set_module(model, name, member)


@torch.no_grad()
def input_grams(model: nn.Module, modules: dict[str, nn.Linear], batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """XᵀX (float64) of each module's inputs over ``batches``; modules sharing a weight get the sum over uses."""
    grams: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str) -> Any:
        def fn(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return fn

    for name, m in modules.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch.get("attention_mask"), use_cache=False)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for names in _tied(modules).values():
        total = sum(grams[n] for n in names)
        for n in names:
            grams[n] = total
    return grams


def max_useful_rank(d_in: int, d_out: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense d_out × d_in weight."""
    return (d_in * d_out - 1) // (d_in + d_out)


def dense_fraction(rank: int, d_in: int, d_out: int) -> float:
    """Parameters of a rank-r factorisation relative to the dense d_out × d_in weight."""
    return rank * (d_in + d_out) / (d_in * d_out)


# -- choosing ranks for a model -----------------------------------------------------------------------
def check_rank(modules: dict[str, nn.Linear], rank: int | None) -> None:
    """Refuse a fixed ``rank`` that is not below min(d_in, d_out) of some target (None: no fixed rank)."""
    if rank is None:
        return
    for name, m in modules.items():
        if rank >= min(m.in_features, m.out_features):
            raise config_error(
                f"{FIELD}.rank",
                rank,
                f"{name} is {m.out_features}×{m.in_features}, so the rank must be below "
                f"{min(m.in_features, m.out_features)}; lower it or drop that target",
            )


def plan(
    model: nn.Module,
    targets: list[str],
    rank: int | None = None,
    energy: float | None = None,
    param_budget: float | None = None,
    batches: list[dict[str, Tensor]] | None = None,
    damping: float = 0.01,
) -> tuple[dict[str, int], dict[str, tuple[Tensor, Tensor]]]:
    """Ranks and factor values for every target linear of ``model`` that gets factorised.

    Exactly one of ``rank`` (fixed), ``energy`` (per layer, :func:`rank_for_energy`) and ``param_budget``
    (global, :func:`ranks_for_budget`) picks the ranks; ``batches`` whiten the SVD (:func:`input_grams`).
    Linears that share a weight get one decision and one pair of factors.
    """
    modules = target_linears(model, targets)
    if not modules:
        raise config_error(f"{FIELD}.targets", targets, "no nn.Linear in the student has these names")
    check_rank(modules, rank)
    grams = input_grams(model, modules, batches) if batches else {}
    firsts = [names[0] for names in _tied(modules).values()]  # one decision per distinct weight
    svds = {n: whitened_svd(modules[n].weight, grams.get(n), damping) for n in firsts}
    spectra = {n: (svds[n][1], modules[n].in_features, modules[n].out_features) for n in firsts}
    if param_budget is not None:
        chosen = ranks_for_budget(spectra, param_budget)
    else:
        chosen = {n: rank if rank is not None else rank_for_energy(s, energy) for n, (s, _, _) in spectra.items()}
    ranks, factors = {}, {}
    for names in _tied(modules).values():
        m, r = modules[names[0]], chosen[names[0]]
        if energy is not None and r > max_useful_rank(m.in_features, m.out_features):
            continue  # the energy asks for a rank that saves nothing: the layer stays dense
        up, down = truncate(svds[names[0]], r, m.weight.dtype)
        for n in names:
            ranks[n] = r
            factors[n] = (up, down)
    return ranks, factors


def summarize_lowrank(config: Mapping[str, Any], _state: dict) -> str:
    """How many linears were factorised, and at what ranks."""
    ranks = list((config.get("ranks") or {}).values())
    if not ranks:
        return "no layer factorised"
    return f"{len(ranks)} linear layers factorised, rank {spread(ranks)} (median {statistics.median(ranks):g})"


def calibration_batches(datamodule: Any, count: int) -> list[dict[str, Tensor]]:
    """The first ``count`` training batches of ``datamodule`` (none when ``count`` is 0), for whitening.

    They are the first blocks of the training set, in order: the same on every rank, so DDP ranks agree.
    """
    if not count:
        return []
    data = getattr(datamodule, "train_set", None)
    if data is None:
        raise config_error(f"{FIELD}.calibration_batches", count, "needs a datamodule with train_set")
    size = datamodule.batch_size
    n = min(count * size, len(data))
    return [datamodule.collate([data[i] for i in range(s, min(s + size, n))]) for s in range(0, n, size)]


LOWRANK = register(
    Stage(
        "lowrank",
        30,
        lambda student, spec: factorize(student, spec["ranks"]),
        before_wrapping=True,
        rebuilds_linears=True,
        summarize=summarize_lowrank,
    )
)
