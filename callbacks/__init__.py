"""Lightning callbacks that compress the student while it trains (QAT, pruning, sharing, low-rank).

Each callback that changes the student's structure records the change through
``DistillModule.record_structure_change`` and registers how to replay it with
:func:`distill.compress.stages.register`, so checkpoints resume into the right shape.
"""
