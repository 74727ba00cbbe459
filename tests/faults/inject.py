"""Faults to inject: a full disk during one call of a writer, an error at its start, or a halt halfway for SIGKILL.

A full disk is real, not mocked: ``RLIMIT_FSIZE`` makes every write that would grow a file past a size fail
with ``EFBIG`` (CPython ignores ``SIGXFSZ``), inside whatever library does the writing, Rust ones included.
"""

from __future__ import annotations

import importlib
import itertools
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


@contextmanager
def full_disk(max_bytes: int) -> Iterator[None]:
    """While the block runs, a write that would make any file larger than ``max_bytes`` fails (errno EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def fail_call(
    monkeypatch: Any,
    owner: Any,
    name: str,
    call: int = 1,
    disk_bytes: int | None = None,
    error: BaseException | None = None,
) -> list[int]:
    """Make the ``call``-th call of ``owner.name`` fail: the disk full during it, or ``error`` raised at its start.

    Returns a list that receives the number of each call, so a test can check the fault was reached.
    """
    real = getattr(owner, name)
    counter, calls = itertools.count(1), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = next(counter)
        calls.append(n)
        if n != call:
            return real(*args, **kwargs)
        if error is not None:
            raise error
        with full_disk(disk_bytes or 4096):
            return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _resolve(target: str) -> tuple[Any, str]:
    module, _, attr = target.partition(":")
    return importlib.import_module(module), attr


class HaltHalfway(pl.Callback):
    """For a ``train.py`` subprocess: the ``call``-th call of ``target`` on a path ending in ``match`` stops halfway.

    The writer runs, its file is cut to half its size (what a write interrupted halfway leaves), the process
    prints ``halfway <path>`` and waits for the test to SIGKILL it. Patched when the config builds the callback.

    Args:
        target: ``module:function`` to patch, looked up where the writer calls it.
        path_arg: the position of the written path among the function's arguments.
        match: only paths ending with this count.
        call: which matching call halts.

    """

    def __init__(self, target: str, path_arg: int = 1, match: str = "", call: int = 1) -> None:
        module, attr = _resolve(target)
        real: Callable[..., Any] = getattr(module, attr)
        counter = itertools.count(1)

        def halting(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            path = Path(args[path_arg])
            if str(path).endswith(match) and next(counter) == call:
                os.truncate(path, path.stat().st_size // 2)
                print(f"\nhalfway {path}", flush=True)
                time.sleep(600)  # until SIGKILL
            return out

        setattr(module, attr, halting)


class SlowSteps(pl.Callback):
    """Sleep ``seconds`` at every training step: a run that takes measurably long, or stays alive long enough."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, *args: object) -> None:
        time.sleep(self.seconds)


class PauseUntil(pl.Callback):
    """Wait at the start of training step ``step`` until the file ``path`` exists: a run kept alive on cue."""

    def __init__(self, path: str, step: int = 1, timeout: float = 600.0) -> None:
        self.path, self.step, self.timeout = Path(path), step, timeout

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        deadline = time.monotonic() + self.timeout
        while trainer.global_step == self.step and not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
