"""The training objective: CE plus a divergence to the teacher, the hidden-state loss, the chunked path."""

from distill.objective.objective import DistillationObjective

__all__ = ["DistillationObjective"]
