"""Uninterrupted runs to compare faulted-then-rerun runs with, one per config, shared by the suite."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.conftest import TINY, compose_cfg
from tests.faults.checks import export_weights


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir) -> Callable[..., dict[str, torch.Tensor]]:
    """``reference(*overrides)``: the exported weights of an uninterrupted tiny run (each config trained once)."""
    from train import train

    done: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def weights(*overrides: str) -> dict[str, torch.Tensor]:
        if overrides not in done:
            out = tmp_path_factory.mktemp("reference")
            train(compose_cfg([*TINY, *overrides], out, cache_dir))
            done[overrides] = export_weights(out)
        return done[overrides]

    return weights
