"""Lightning callbacks that compress the student while it trains (QAT, pruning, sharing, low-rank).

Each compression callback is a :class:`callbacks.base.CompressionCallback` (the
:class:`~distill.compress.stages.CompressionStage` protocol). It records every change to the student's
structure through ``DistillModule.record_structure_change``; :mod:`distill.compress.replay` rebuilds
those changes when a checkpoint loads, so checkpoints resume into the right shape.
"""
