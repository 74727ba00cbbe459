"""Low-rank factorization of the student's linears as a callback; the maths is :mod:`distill.compress.lowrank`."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from callbacks.base import CompactCompression
from distill.compress import lowrank
from distill.compress.lowrank import DEFAULT_TARGETS, FIELD, LOWRANK, factorize, target_linears
from distill.config import config_error
from distill.cost import parameter_count
from distill.runtime.rank_zero_load import has_meta_tensors
from distill.runtime.ranks import computed_on_rank_zero

log = logging.getLogger(__name__)


class LowRankFactorization(CompactCompression):
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

    stage = LOWRANK.name
    mid_run_refused = "factorising"

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
            raise config_error(FIELD, chosen or None, "set exactly one of rank, energy, param_budget (others null)")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise config_error(f"{FIELD}.rank", rank, "must be a positive int")
        if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise config_error(f"{FIELD}.energy", energy, "the energy threshold must lie in (0, 1]")
        if param_budget is not None and not (isinstance(param_budget, (int, float)) and 0 < param_budget <= 1):
            raise config_error(f"{FIELD}.param_budget", param_budget, "the budget must lie in (0, 1]")
        if not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise config_error(f"{FIELD}.calibration_batches", calibration_batches, "must be an int ≥ 0")
        if not damping > 0:
            raise config_error(f"{FIELD}.damping", damping, "must be > 0")
        if not isinstance(start_step, int) or start_step < 0:
            raise config_error(f"{FIELD}.start_step", start_step, "must be a step number ≥ 0")
        self.targets = list(targets)
        self.rank, self.energy, self.param_budget = rank, energy, param_budget
        self.calibration_batches = calibration_batches
        self.damping = damping
        self.start_step = self.end_step = start_step
        self.compact_dir = compact_dir
        self.ranks: dict[str, int] | None = None

    def check_rank(self, modules: dict[str, nn.Linear]) -> None:
        """Refuse a fixed rank that is not below min(d_in, d_out) of some target."""
        lowrank.check_rank(modules, self.rank)

    def plan(
        self, model: nn.Module, batches: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, int], dict[str, tuple[Tensor, Tensor]]]:
        """Ranks and factor values for every target of ``model`` that gets factorised."""
        return lowrank.plan(model, self.targets, self.rank, self.energy, self.param_budget, batches, self.damping)

    def compress(self, student: nn.Module, datamodule: Any = None) -> dict[str, int]:
        """Factorise ``student`` in place as configured (calibrating on ``datamodule``); returns the ranks.

        Several processes factorise to rank 0's ranks. A rank that holds the weights computes the same factors
        (the calibration batches are the same on every rank); one whose student was built empty (FSDP ranks
        > 0, distill/runtime/rank_zero_load.py) takes the shapes only, and rank 0's values when FSDP wraps it.
        """
        plans: list[tuple[dict[str, int], dict[str, tuple[Tensor, Tensor]]]] = []

        def planned() -> dict[str, int]:
            plans.append(self.plan(student, lowrank.calibration_batches(datamodule, self.calibration_batches)))
            return plans[0][0]

        ranks = computed_on_rank_zero(planned)
        if not plans and not has_meta_tensors(student):
            planned()
            if plans[0][0] != ranks:
                raise RuntimeError("low-rank factorisation chose other ranks on this process than on rank 0")
        factorize(student, ranks, plans[0][1] if plans else None)
        return ranks

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fixed rank too large for some target fails before any training."""
        self.check_rank(target_linears(pl_module.student, self.targets))

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Factorise the student and record the ranks; mid-run, the new factors start with empty Adam state."""
        student = pl_module.student
        before = parameter_count(student)
        ranks = self.compress(student, trainer.datamodule)
        pl_module.record_structure_change(self.stage, {"ranks": ranks})
        self.ranks = ranks
        if rebuild:
            pl_module.rebuild_optimizers()  # the factors are new Parameters: their Adam state starts empty
        log.info(
            "factorised %d linears at step %d (ranks %s): %d → %d student parameters",
            len(ranks),
            trainer.global_step,
            sorted(set(ranks.values())),
            before,
            parameter_count(student),
        )
