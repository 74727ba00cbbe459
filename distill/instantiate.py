"""Building the named callback and logger nodes of the config."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from distill.errors import ConfigError


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception (Hydra wraps errors raised inside ``_target_`` calls)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Entry points: a ConfigError anywhere inside (even wrapped by Hydra) becomes one line and exit code 2."""
    try:
        yield
    except Exception as err:
        config_err = find_config_error(err)
        if config_err is None:
            raise
        print(f"error: {config_err}", file=sys.stderr)
        sys.exit(2)


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a ConfigError from the target surface as itself."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as err:
        config_err = find_config_error(err)
        if config_err is not None and config_err is not err:
            raise config_err from None
        raise


def _instantiate_named(nodes: DictConfig | None, kind: type, group: str) -> list[Any]:
    out: list[Any] = []
    for name, node in (nodes or {}).items():
        if node is None:  # a node set to null in an override switches that entry off
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise TypeError(f"{group}.{name}: expected a node with _target_, got {node!r}")
        obj = build(node)
        if not isinstance(obj, kind):
            raise TypeError(f"{group}.{name}: {type(obj).__name__} is not a {kind.__name__}")
        out.append(obj)
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every callback node under ``callbacks:``."""
    return _instantiate_named(cfg, Callback, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger node under ``logger:``."""
    return _instantiate_named(cfg, Logger, "logger")
