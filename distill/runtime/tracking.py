"""Weights & Biases: offline when there is no API key, secrets kept out of what is logged, results published.

Lightning's ``WandbLogger`` does the logging; this module decides the mode before ``wandb.init`` can block
on an interactive login, redacts secrets from the logged config, and logs the exported student as an
artifact (the held-out comparison table is logged by train.py through ``log_table``).
"""

from __future__ import annotations

import netrc
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger, WandbLogger

REDACTED = "<redacted>"
URL_PASSWORD = "***"
# A config key (or environment variable name) names a secret when one of its words (split at _ - . and camelCase)
# says so: `aws_secret_access_key`, `db_password`, `passwd`, `credentials`. A `key` or `token` counts only with
# the words that make it one (`api_key`, `private_key`, `access_key_id`, `hf_token`, `GITHUB_PAT`), so
# `tokenizer`, `max_tokens`, `pad_token`, `data_key` and `top_k` stay readable.
SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwords", "passwd", "passphrase", "credential", "credentials"}
)
SECRET_JOINED = frozenset({"apikey", "accesskey", "secretkey", "privatekey", "authtoken", "accesstoken"})
KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "auth", "signing", "encryption", "master", "ssh"})
# A tokenizer's special tokens are strings like "</s>", not credentials.
SPECIAL_TOKENS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "stop", "start", "end", "special"})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# `scheme://user:password@host`: the password of a URL (database, broker, proxy), whatever key holds it; up to the
# authority's last @, so an unescaped @ inside the password does not leave its tail readable.
URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*):(?P<password>[^/?#\s]+)@")
# `https://TOKEN@host`: over HTTP(S) a user part without a password is a token (git's and most hubs' basic auth
# take the token as the user name); ssh's `git@host` user is not, and stays.
HTTP_TOKEN_USER = re.compile(r"(?P<head>\bhttps?://)(?P<user>[^:/?#@\s]+)@", re.IGNORECASE)
WANDB_HOST = "api.wandb.ai"


def has_api_key(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb can log in without asking: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    path = Path(environ.get("NETRC") or Path(environ.get("HOME", "~")).expanduser() / ".netrc")
    try:
        host = (environ.get("WANDB_BASE_URL") or WANDB_HOST).split("://")[-1].rstrip("/")
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name names a secret (see :data:`SECRET_WORDS`)."""
    words = [w.lower() for w in _WORD.findall(str(name))]
    if any(w in SECRET_WORDS or w in SECRET_JOINED for w in words):
        return True
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        if word == "key" and before in KEY_QUALIFIERS:
            return True
        if word == "token" and i == len(words) - 1 and before not in SPECIAL_TOKENS:
            return True
    return len(words) > 1 and words[-1] == "pat"  # a personal access token: GITHUB_PAT, gitlab_pat


def redact(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A copy of a config tree with secret-named keys, URL passwords and any occurrence of ``secrets`` replaced.

    A URL keeps its user and host: ``postgres://user:pw@host/db`` becomes ``postgres://user:***@host/db``; an
    HTTP(S) user part alone is a token: ``https://TOKEN@host/repo`` becomes ``https://***@host/repo``.
    """
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_name(k) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        value = URL_CREDENTIALS.sub(rf"\g<head>:{URL_PASSWORD}@", value)
        value = HTTP_TOKEN_USER.sub(rf"\g<head>{URL_PASSWORD}@", value)
    return value


def _secrets() -> tuple[str, ...]:
    # Only values long enough to be a credential: replacing a 1-character value would mangle the config.
    return tuple(v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8)


class DistillWandbLogger(WandbLogger):
    """``WandbLogger`` that never logs secrets and can publish the student and the evaluation table."""

    def log_hyperparams(self, params: Any) -> None:
        """Log the config with secrets redacted (by key name and by the value of secret environment variables)."""
        if isinstance(params, Mapping):
            params = redact(dict(params), _secrets())
        super().log_hyperparams(params)

    def log_student(self, export_dir: str | Path) -> None:
        """Log the exported student folder as a ``model`` artifact of this run."""
        import wandb

        artifact = wandb.Artifact(name=f"student-{self.experiment.id}", type="model")
        artifact.add_dir(str(export_dir))
        self.experiment.log_artifact(artifact)


def wandb_logger(**kwargs: Any) -> DistillWandbLogger:
    """Build the W&B logger, switching to offline mode when no API key is available.

    Without a key ``wandb.init`` would wait for an interactive login, which hangs a batch job; offline
    mode logs to ``<save_dir>/wandb/offline-run-*`` and prints the ``wandb sync`` command that uploads it.
    ``WANDB_MODE`` set in the environment is respected as it is.

    Args:
        **kwargs: passed to Lightning's ``WandbLogger`` (project, name, save_dir, id, offline...).

    """
    if not kwargs.get("offline") and not os.environ.get("WANDB_MODE") and not has_api_key():
        kwargs["offline"] = True
        where = Path(kwargs.get("save_dir") or ".") / "wandb"
        print(
            f"W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline to {where}/offline-run-*; "
            f"upload it later with: wandb sync {where}/offline-run-*",
            file=sys.stderr,
            flush=True,
        )
    return DistillWandbLogger(**kwargs)


def publish_student(loggers: list[Logger], export_dir: str | Path) -> None:
    """Hand the exported student to every logger that stores artifacts (W&B); others are skipped."""
    for lg in loggers:
        if hasattr(lg, "log_student"):
            lg.log_student(export_dir)


class LogConfig(Callback):
    """Log the run's resolved config, secrets redacted, to every logger when fitting starts.

    Redacted here, for every logger: the CSV and TensorBoard loggers write what they get to
    ``hparams.yaml`` in plain text, and a secret resolved from the environment
    (``${oc.env:MY_API_TOKEN}``) would otherwise land there. Logged at fit start, after the callbacks'
    and the module's setup, so a setting refused during setup leaves no file behind.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = redact(dict(config), _secrets())

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Hand the redacted config to each logger."""
        for lg in trainer.loggers:
            lg.log_hyperparams(self.config)
