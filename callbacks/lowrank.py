"""Low-rank factorization of the student's linear layers (truncated SVD, optionally whitened) as a callback.

A linear W (d_out × d_in) becomes ``up(down(x))`` with factors of rank r (:class:`LowRankLinear`), cutting
its parameters from d_out·d_in to r·(d_out + d_in). The rank is chosen per layer by an energy threshold,
by one global parameter budget, or fixed. With calibration batches the truncation is done on
``W·L`` where ``L·Lᵀ`` is the Gram matrix of the layer's real inputs (SVD-LLM, in the spirit of ASVD), so
the discarded part is the one that matters least on the data rather than on the weights alone.

Hand-written because no maintained library does data-whitened SVD factorization of transformers linears
with a parameter budget (torch gives the SVD and the Cholesky factor; the rest is a few lines).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.compress import stages as structure
from distill.config import config_error
from distill.export.hf import compact_unless_quantized
from distill.export.loaders.load_compact import LowRankLinear, _lora_layers, save_compact, set_module
from distill.export.loaders.load_compact import materialize as materialize_plain

log = logging.getLogger(__name__)

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
    lora = tuple(f"{n}." for n in _lora_layers(model))
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
            raise config_error("callbacks.lowrank", name, "only plain nn.Linear layers can be factorised")
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


@structure.register("lowrank")
def _replay(student: nn.Module, spec: dict[str, Any]) -> None:
    factorize(student, spec["ranks"])


class LowRankFactorization(pl.Callback):
    """Factorise the student's linears by truncated SVD at ``start_step``; distillation then heals them.

    Exactly one of ``rank``, ``energy`` and ``param_budget`` picks the ranks.

    Args:
        targets: last name components of the linears to factorise (default: every decoder projection).
        rank: one fixed rank for every target; must be below min(d_in, d_out) of each.
        energy: per layer, the smallest rank keeping this share of the squared singular values, in (0, 1].
        param_budget: one global budget: the share of the targets' dense parameters to keep, in (0, 1].
        calibration_batches: training batches whose activations whiten the SVD (0: plain SVD of the weights).
        damping: ridge added to the calibration Gram matrix, relative to its mean diagonal.
        start_step: the optimizer step at which to factorise (0: before training starts).
        compact_dir: folder name, under the run directory, of the compact export.

    """

    stage = "lowrank"

    def __init__(
        self,
        targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
        rank: int | None = None,
        energy: float | None = None,
        param_budget: float | None = None,
        calibration_batches: int = 0,
        damping: float = 0.01,
        start_step: int = 0,
        compact_dir: str = "student_compact",
    ) -> None:
        chosen = [k for k, v in (("rank", rank), ("energy", energy), ("param_budget", param_budget)) if v is not None]
        if len(chosen) != 1:
            raise config_error(
                "callbacks.lowrank", chosen or None, "set exactly one of rank, energy, param_budget (others null)"
            )
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise config_error("callbacks.lowrank.rank", rank, "must be a positive int")
        if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise config_error("callbacks.lowrank.energy", energy, "the energy threshold must lie in (0, 1]")
        if param_budget is not None and not (isinstance(param_budget, (int, float)) and 0 < param_budget <= 1):
            raise config_error("callbacks.lowrank.param_budget", param_budget, "the budget must lie in (0, 1]")
        if not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise config_error("callbacks.lowrank.calibration_batches", calibration_batches, "must be an int ≥ 0")
        if not damping > 0:
            raise config_error("callbacks.lowrank.damping", damping, "must be > 0")
        if not isinstance(start_step, int) or start_step < 0:
            raise config_error("callbacks.lowrank.start_step", start_step, "must be a step number ≥ 0")
        self.targets = list(targets)
        self.rank, self.energy, self.param_budget = rank, energy, param_budget
        self.calibration_batches = calibration_batches
        self.damping = damping
        self.start_step = self.end_step = start_step
        self.compact_dir = compact_dir
        self.ranks: dict[str, int] | None = None

    # -- choosing ranks ---------------------------------------------------------------------------
    def check_rank(self, modules: dict[str, nn.Linear]) -> None:
        """Refuse a fixed rank that is not below min(d_in, d_out) of some target."""
        if self.rank is None:
            return
        for name, m in modules.items():
            if self.rank >= min(m.in_features, m.out_features):
                raise config_error(
                    "callbacks.lowrank.rank",
                    self.rank,
                    f"{name} is {m.out_features}×{m.in_features}, so the rank must be below "
                    f"{min(m.in_features, m.out_features)}; lower it or drop that target",
                )

    def plan(
        self, model: nn.Module, batches: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, int], dict[str, tuple[Tensor, Tensor]]]:
        """Ranks and factor values for every target of ``model`` that gets factorised."""
        modules = target_linears(model, self.targets)
        if not modules:
            raise config_error("callbacks.lowrank.targets", self.targets, "no nn.Linear in the student has these names")
        self.check_rank(modules)
        grams = input_grams(model, modules, batches) if batches else {}
        firsts = [names[0] for names in _tied(modules).values()]  # one decision per distinct weight
        svds = {n: whitened_svd(modules[n].weight, grams.get(n), self.damping) for n in firsts}
        spectra = {n: (svds[n][1], modules[n].in_features, modules[n].out_features) for n in firsts}
        if self.param_budget is not None:
            chosen = ranks_for_budget(spectra, self.param_budget)
        else:
            chosen = {
                n: self.rank if self.rank is not None else rank_for_energy(s, self.energy)
                for n, (s, _, _) in spectra.items()
            }
        ranks, factors = {}, {}
        for names in _tied(modules).values():
            m, r = modules[names[0]], chosen[names[0]]
            if self.energy is not None and r > max_useful_rank(m.in_features, m.out_features):
                continue  # the energy asks for a rank that saves nothing: the layer stays dense
            up, down = truncate(svds[names[0]], r, m.weight.dtype)
            for n in names:
                ranks[n] = r
                factors[n] = (up, down)
        return ranks, factors

    def calibration(self, dm: Any) -> list[dict[str, Tensor]]:
        """The calibration batches (none unless ``calibration_batches`` > 0) from a datamodule's train set."""
        if not self.calibration_batches:
            return []
        data = getattr(dm, "train_set", None)
        if data is None:
            raise config_error(
                "callbacks.lowrank.calibration_batches", self.calibration_batches, "needs a datamodule with train_set"
            )
        # The first blocks of the training set, in order: the same on every rank, so DDP ranks agree.
        size = dm.batch_size
        n = min(self.calibration_batches * size, len(data))
        return [dm.collate([data[i] for i in range(s, min(s + size, n))]) for s in range(0, n, size)]

    def compress(self, student: nn.Module, datamodule: Any = None) -> dict[str, int]:
        """Factorise ``student`` in place as configured (calibrating on ``datamodule``); returns the ranks."""
        ranks, factors = self.plan(student, self.calibration(datamodule))
        factorize(student, ranks, factors)
        return ranks

    # -- hooks ------------------------------------------------------------------------------------
    @staticmethod
    def _applied(pl_module: pl.LightningModule) -> bool:
        return any(c["kind"] == "lowrank" for c in pl_module.structure)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the targets and rank, then factorise now when ``start_step`` is 0 (before DDP wraps)."""
        self.check_rank(target_linears(pl_module.student, self.targets))
        if self.start_step > 0 and trainer.world_size > 1:
            raise config_error(
                "callbacks.lowrank.start_step",
                self.start_step,
                "factorising mid-run under a multi-process strategy would need the model re-wrapped; use "
                "start_step=0 with DDP (the change happens before wrapping)",
            )
        if self.start_step == 0 and not self._applied(pl_module):
            # Sharing comes first (STAGES); its setup is idempotent, so run it now whatever the callback order.
            for cb in trainer.callbacks:
                if getattr(cb, "stage", None) == "share" and getattr(cb, "start_step", None) == 0:
                    cb.setup(trainer, pl_module, stage)
            self._apply(trainer, pl_module, rebuild=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Factorise at ``start_step`` (a resumed run that already did got its structure from the checkpoint)."""
        if self.start_step > 0 and trainer.global_step >= self.start_step and not self._applied(pl_module):
            self._apply(trainer, pl_module, rebuild=True)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        student = pl_module.student
        before = sum(p.numel() for p in student.parameters())
        ranks = self.compress(student, trainer.datamodule)
        pl_module.record_structure_change("lowrank", {"ranks": ranks})
        self.ranks = ranks
        if rebuild:
            pl_module.rebuild_optimizers()  # the factors are new Parameters: their Adam state starts empty
        after = sum(p.numel() for p in student.parameters())
        log.info(
            "factorised %d linears at step %d (ranks %s): %d → %d student parameters",
            len(ranks),
            trainer.global_step,
            sorted(set(ranks.values())),
            before,
            after,
        )

    # -- export -----------------------------------------------------------------------------------
    def materialize(self, model: PreTrainedModel) -> PreTrainedModel:
        """A plain copy for ``save_pretrained``: W = up·down multiplied back (and any ties cloned)."""
        return materialize_plain(model)

    def export_compact(self, model: PreTrainedModel, tokenizer: Any, run_dir: Path) -> Path | None:
        """Write the factors (each shared tensor once) plus ranks and a loader (see :mod:`distill.export.loaders.load_compact`)."""
        return compact_unless_quantized(
            save_compact, model, tokenizer, Path(run_dir) / self.compact_dir, type(self).__name__
        )


def max_useful_rank(d_in: int, d_out: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense d_out × d_in weight."""
    return (d_in * d_out - 1) // (d_in + d_out)


def dense_fraction(rank: int, d_in: int, d_out: int) -> float:
    """Parameters of a rank-r factorisation relative to the dense d_out × d_in weight."""
    return rank * (d_in + d_out) / (d_in * d_out)


__all__ = [
    "DEFAULT_TARGETS",
    "LowRankFactorization",
    "LowRankLinear",
    "dense_fraction",
    "factorize",
    "input_grams",
    "max_useful_rank",
    "rank_for_energy",
    "ranks_for_budget",
    "svd_factors",
    "target_linears",
    "truncate",
    "whitened_svd",
]
