"""Building objects from the config, and the one kind of error a user can fix.

:class:`ConfigError` carries every message about bad input; entry points print it as one line
(:func:`exit_on_config_error`). :func:`build` and the ``instantiate_*`` helpers turn ``_target_`` nodes into
objects without letting Hydra's wrapping hide such an error.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A configuration or input problem the user can fix.

    Messages follow one pattern: the field, the bad value, then the fix.
    """


def config_error(field: str, value: object, fix: str) -> ConfigError:
    """Build a ConfigError whose message names the field, the bad value and the fix."""
    return ConfigError(f"{field}={value!r}: {fix}")


def missing_value(key: str) -> ConfigError:
    """The error for a required setting left at ``???`` in the config."""
    return ConfigError(f"{key}=???: this setting is required; give it on the command line ({key}=...)")


def require(cfg: DictConfig, *keys: str) -> None:
    """Refuse, before any slow work, a run whose required settings (``???`` in the config) were not given."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise missing_value(key)


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception (Hydra wraps errors raised inside ``_target_`` calls).

    A required setting that was never given (omegaconf's ``MissingMandatoryValue``) counts as one too.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        if isinstance(err, MissingMandatoryValue):
            return missing_value(str(err.full_key))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# What Hydra writes into a run folder before the job starts: its records of the call and the job's log.
_HYDRA_RECORDS = {".hydra", "train.log", "evaluate.log", "main.log"}


@contextmanager
def exit_on_config_error(
    discard: str | Path | None = None, origin: Callable[[str], str | None] | None = None
) -> Iterator[None]:
    """Entry points: a ConfigError anywhere inside (even wrapped by Hydra) becomes one line and exit code 2.

    Args:
        discard: the run folder Hydra made for this call. When the error comes before the run wrote
            anything of its own, the folder (Hydra's records and an empty log) is removed, so a refused
            setting leaves no run behind. A folder with anything else in it (a run being resumed) is kept.
        origin: for an error about a setting the user did not type, where it came from (e.g.
            :meth:`ConfigOrigin.explain`), appended to the line.

    """
    try:
        yield
    except Exception as err:
        config_err = find_config_error(err)
        if config_err is None:
            raise
        folder = Path(discard) if discard is not None else None
        if folder is not None and folder.is_dir() and {p.name for p in folder.iterdir()} <= _HYDRA_RECORDS:
            shutil.rmtree(folder, ignore_errors=True)
        message = str(config_err)
        where = origin(error_field(message)) if origin is not None else None
        print(f"error: {message}" + (f" ({where})" if where else ""), file=sys.stderr)
        sys.exit(2)


def error_field(message: str) -> str:
    """The config field a ConfigError's message starts with (``field=value: fix`` or ``field: message``)."""
    return message.split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]


_EXPERIMENT_KEYS = ("experiment", "+experiment", "++experiment", "~experiment")


@dataclass(frozen=True)
class ConfigOrigin:
    """Which settings the user typed, so a message about one they did not type can say where it came from.

    Attributes:
        overrides: the command line's overrides (Hydra's ``overrides.task``).
        experiment: the ``experiment`` group's choice in the composed config (None: none).
        config_dir: the folder of the root config, to compose the same call without the experiment.
        config_name: the root config's name.

    """

    overrides: tuple[str, ...] = ()
    experiment: str | None = None
    config_dir: str | None = None
    config_name: str = "train"

    @classmethod
    def from_hydra(cls) -> ConfigOrigin:
        """The origin of the running Hydra app's config (call inside ``@hydra.main``)."""
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        conf_dir = next((s.path for s in hc.runtime.config_sources if s.provider == "main"), None)
        return cls(tuple(hc.overrides.task), hc.runtime.choices.get("experiment"), conf_dir, hc.job.config_name)

    def _keys(self) -> list[str]:
        return [o.split("=", 1)[0].lstrip("+~") for o in self.overrides]

    def typed(self, field: str) -> bool:
        """Whether the user typed ``field``, one of its parents or one of its children."""
        return any(k == field or field.startswith(f"{k}.") or k.startswith(f"{field}.") for k in self._keys())

    @property
    def experiment_typed(self) -> bool:
        """Whether the user chose the experiment (or removed it) on the command line."""
        return any(o.split("=", 1)[0] in _EXPERIMENT_KEYS for o in self.overrides)

    def set_by_experiment(self, field: str) -> bool:
        """Whether the experiment, not the user or the defaults, gave ``field`` its value."""
        if self.experiment is None or self.typed(field) or self.config_dir is None:
            return False
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        rest = [o for o in self.overrides if o.split("=", 1)[0] not in _EXPERIMENT_KEYS]
        with_it = [*rest, f"experiment={self.experiment}"]
        values = []
        for overrides in (with_it, [*rest, "~experiment"]):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=self.config_dir, version_base="1.3"):
                cfg = compose(config_name=self.config_name, overrides=overrides)
            node = OmegaConf.select(cfg, field, default="<unset>", throw_on_resolution_failure=False)
            values.append(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)
        return values[0] != values[1]

    def explain(self, field: str) -> str | None:
        """For a setting the user did not type: the experiment that set it and the way out; else None."""
        if not self.set_by_experiment(field):
            return None
        chosen = f"experiment={self.experiment}" + ("" if self.experiment_typed else ", the default run")
        return f"set by {chosen}; give {field}=... on the command line, or run without the recipe: '~experiment'"


def root_message(err: BaseException) -> str:
    """The first line of the innermost cause of ``err``: what the library that refused the value said."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def as_config_error(field: str, err: BaseException) -> ConfigError:
    """A library's refusal of a setting under ``field``, as one ConfigError line that names the field.

    Torch, Lightning and Hydra name the bad value in their own words (``Invalid learning rate: -1``,
    ``max_steps must be a non-negative integer``); the line adds which config node it came from.
    """
    message = root_message(err).replace("set env var HYDRA_FULL_ERROR=1 to see chained exception.", "").strip()
    return ConfigError(f"{field}: {message}; fix this setting under {field}")


def build(node: Any, field: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a ConfigError from the target surface as itself.

    With ``field`` (the node's path in the config), any other refusal of the node's settings (an unknown
    ``_target_``, an unexpected argument, a value the library rejects) becomes a ConfigError naming it.
    """
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as err:
        config_err = find_config_error(err)
        if config_err is not None and config_err is not err:
            raise config_err from None
        if config_err is None and field is not None:
            raise as_config_error(field, err) from err
        raise


def _instantiate_named(nodes: DictConfig | None, kind: type, group: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in (nodes or {}).items():
        if node is None:  # a node set to null in an override switches that entry off
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise TypeError(f"{group}.{name}: expected a node with _target_, got {node!r}")
        obj = build(node, field=f"{group}.{name}")
        if not isinstance(obj, kind):
            raise TypeError(f"{group}.{name}: {type(obj).__name__} is not a {kind.__name__}")
        out[str(name)] = obj
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every callback node under ``callbacks:``, in config order."""
    return list(named_callbacks(cfg).values())


def named_callbacks(cfg: DictConfig | None) -> dict[str, Callback]:
    """Instantiate every callback node under ``callbacks:``, keyed by its name in the config."""
    return _instantiate_named(cfg, Callback, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger node under ``logger:``."""
    return list(_instantiate_named(cfg, Logger, "logger").values())


def check_optimization(optimizer: DictConfig, scheduler: DictConfig | None) -> None:
    """Build the optimizer and the LR schedule once on a stand-in parameter, so a bad setting fails now.

    Without this, ``distill.optimizer.lr=-1`` would surface as torch's ``ValueError`` from inside
    ``trainer.fit``, after the teacher loaded and the loggers wrote their first files.

    Raises:
        ConfigError: naming ``distill.optimizer`` or ``distill.scheduler`` and what the library refused.

    """
    import torch

    for key in ("num_warmup_steps", "num_training_steps"):
        value = (scheduler or {}).get(key)
        if isinstance(value, (int, float)) and value < 0:
            why = (
                " (by default it is trainer.max_steps: give the run a step count)"
                if key == "num_training_steps"
                else ""
            )
            raise config_error(f"distill.scheduler.{key}", value, f"must be 0 or more steps{why}")
    stand_in = torch.nn.Parameter(torch.zeros(1))
    make_optimizer = build(optimizer, field="distill.optimizer")
    try:
        opt = make_optimizer(params=[stand_in])
    except Exception as err:
        raise as_config_error("distill.optimizer", err) from err
    if scheduler is None:
        return
    make_scheduler = build(scheduler, field="distill.scheduler")
    try:
        make_scheduler(optimizer=opt)
    except Exception as err:
        raise as_config_error("distill.scheduler", err) from err
