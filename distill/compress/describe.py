"""Small text helpers for the report's one-line summaries of the compression stages' recorded changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def short(x: Any, width: int = 40) -> str:
    """A value in a few characters: lists and dicts by their size, long strings cut."""
    if isinstance(x, (list, tuple)):
        return f"{len(x)} items"
    if isinstance(x, dict):
        return f"{len(x)} entries"
    if isinstance(x, float):
        return f"{x:g}"
    text = str(x)
    return text if len(text) <= width else text[: width - 1] + "…"


def spread(values: Sequence[int]) -> str:
    """One number when all are equal, else their range: ``768`` or ``700–900``."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"
