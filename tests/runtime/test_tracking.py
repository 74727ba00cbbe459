"""W&B without an account: offline mode end to end, secrets kept out of logs, the export as an artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distill.runtime import tracking
from distill.runtime.tracking import REDACTED, has_api_key, redact, wandb_logger
from train import train

pytest.importorskip("wandb")

KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key (40 hex characters)


def _settled_records(run_dir: Path, seconds: float = 30.0) -> list:
    """The run's records once wandb-core has written them: it flushes the file from its own process,
    and once (in a full-suite run) the file still held no record right after ``wandb.finish()``."""
    deadline = time.monotonic() + seconds
    from google.protobuf.message import DecodeError

    while True:
        try:  # a record still being written reads as a truncated message
            records = _records(run_dir)
        except DecodeError:
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "history" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _records(run_dir: Path) -> list:
    """Every record of an offline run's .wandb log, as wandb's own protobuf ``Record`` messages.

    wandb 0.31 dropped its Python reader for this file (the Go core writes it), so the framing is read
    here: a 7-byte ``:W&B`` header, then LevelDB-log records (crc32c, little-endian length, type) in
    32 KiB blocks, where a message may span blocks as FIRST/MIDDLE/LAST pieces.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data, block, pos, piece, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole message
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(piece)
            out.append(rec)
            piece = b""
    return out


def test_api_key_detection(tmp_path):
    assert has_api_key({"WANDB_API_KEY": KEY})
    assert not has_api_key({"NETRC": str(tmp_path / "missing")})
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert has_api_key({"NETRC": str(netrc)})
    assert not has_api_key({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})


def test_redact_by_key_name_and_by_secret_value():
    cfg = {"a": {"api_key": "x", "wandb_token": 3, "lr": 0.1}, "url": f"https://h/?k={KEY}", "l": [KEY, 1]}
    out = redact(cfg, (KEY,))
    assert out == {
        "a": {"api_key": REDACTED, "wandb_token": REDACTED, "lr": 0.1},
        "url": f"https://h/?k={REDACTED}",
        "l": [REDACTED, 1],
    }


@pytest.mark.parametrize(
    "name",
    [
        "aws_secret_access_key",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "private_key",
        "GITHUB_PAT",
        "gitlab_pat",
        "db_password",
        "smtp_passwd",
        "ssh_passphrase",
        "apiKey",
        "clientSecret",
        "access_token",
        "token",
        "google_application_credentials",
    ],
)
def test_secret_names_are_redacted(name):
    assert redact({name: "s3cr3t-value", "lr": 0.1}) == {name: REDACTED, "lr": 0.1}


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer",
        "cross_tokenizer",
        "max_tokens",
        "max_new_tokens",
        "prompt_tokens",
        "pad_token",
        "eos_token_id",
        "key",
        "data_key",
        "sort_key",
        "top_k",
        "pattern",
        "path",
        "PWD",
        "TOKENIZERS_PARALLELISM",
    ],
)
def test_harmless_names_are_kept(name):
    assert redact({name: "value-kept"}) == {name: "value-kept"}


def test_passwords_inside_urls_are_masked_keeping_user_host_and_path():
    cfg = {
        "db": "postgres://user:pass@host/db",
        "broker": "amqp://guest:p@ss@rabbit:5672/vhost",  # an unescaped @ inside the password
        "cache": "redis://:pw@cache:6379/0",
        "hub": ["https://huggingface.co/org/model", "ssh://git@github.com/org/repo"],  # no password: kept
        "remote": "https://ghp_abcdef0123456789@github.com/org/repo.git",  # a token as the user name
    }
    assert redact(cfg) == {
        "db": "postgres://user:***@host/db",
        "broker": "amqp://guest:***@rabbit:5672/vhost",
        "cache": "redis://:***@cache:6379/0",
        "hub": ["https://huggingface.co/org/model", "ssh://git@github.com/org/repo"],
        "remote": "https://***@github.com/org/repo.git",
    }


def test_secrets_in_the_environment_are_found_by_their_new_names(monkeypatch, tmp_path):
    pat, aws = "ghp_" + KEY[:36], "wJalrXUtnFEMI/K7MDENG/" + KEY[:18]
    monkeypatch.setenv("GITHUB_PAT", pat)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    monkeypatch.setenv("PWD", str(tmp_path))  # the working directory is no secret, and paths hold it
    found = tracking._secrets()
    assert pat in found and aws in found and str(tmp_path) not in found
    cfg = {"remote": f"https://x:{pat}@github.com/o/r", "note": f"s3 {aws}", "dir": f"{tmp_path}/run"}
    assert redact(cfg, found) == {
        "remote": "https://x:***@github.com/o/r",
        "note": f"s3 {REDACTED}",
        "dir": f"{tmp_path}/run",
    }


def test_hparams_yaml_holds_no_secret_under_common_names(tiny_cfg, tmp_path, monkeypatch):
    """What the CSV logger writes to hparams.yaml: secrets under every common name are redacted, the rest kept."""
    monkeypatch.setenv("GITHUB_PAT", "ghp_" + KEY[:36])
    cfg = tiny_cfg(
        "trainer.max_steps=1",
        "export.enabled=false",
        "eval.enabled=false",
        "+extra.aws_secret_access_key=aws-" + KEY,
        "+extra.private_key=pk-" + KEY,
        "+extra.database='postgres://user:pw-" + KEY[:12] + "@db.example.com/runs'",
        "+extra.repo='https://github.com/${oc.env:GITHUB_PAT}/x'",
        "+extra.max_tokens=128",
    )
    train(cfg)
    (hparams,) = tmp_path.glob("csv/version_*/hparams.yaml")
    text = hparams.read_text()
    for secret in ("aws-" + KEY, "pk-" + KEY, "pw-" + KEY[:12], "ghp_" + KEY[:36]):
        assert secret not in text
    assert "postgres://user:***@db.example.com/runs" in text and "max_tokens: 128" in text
    assert "tokenizer" in text  # the tokenizer settings are not mistaken for secrets


def test_an_explicit_mode_is_respected(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = wandb_logger(project="p", save_dir=str(tmp_path))
    assert logger._wandb_init.get("mode") != "offline"  # the user's WANDB_MODE decides, not the fallback
    assert "no API key" not in capsys.readouterr().err


def test_offline_run_end_to_end_logs_metrics_and_the_student_without_secrets(tiny_cfg, tmp_path, monkeypatch, capfd):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("MY_SERVICE_TOKEN", KEY)  # a secret in the environment...
    cfg = tiny_cfg(
        "logger=wandb",
        "run_name=wb-test",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=4",
        "export.verify=false",
        "eval.enabled=false",  # the held-out report and its W&B table belong to the evaluation tests
        "+tracking.api_key=plain-secret-in-config",  # ...and one typed into the config
        "+tracking.endpoint='${oc.env:MY_SERVICE_TOKEN}'",
    )
    try:
        metrics, objects = train(cfg)
        run_id = wandb.run.id
    finally:
        wandb.finish()
    out = capfd.readouterr()
    text = out.out + out.err
    assert "W&B: no API key" in text and "wandb sync" in text  # it said how to upload the run
    assert run_id == "wb-test"  # the id is the run name, so a resumed run continues the same W&B run

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = _settled_records(run_dir)
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 4, [r.WhichOneof("record_type") for r in records]
    assert losses[-1] == pytest.approx(metrics["train/loss"], rel=1e-6)  # what the run saw
    assert any("val/loss" in h for h in history)
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["tracking"] == {"api_key": REDACTED, "endpoint": REDACTED}
    assert config["trainer"]["max_steps"] == 4 and config["run_name"] == "wb-test"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [a.name for a in artifacts] == ["student-wb-test"] and artifacts[0].type == "model"
    assert {"model.safetensors", "config.json"} <= {e.path for e in artifacts[0].manifest.contents}
    assert Path(objects["export_dir"], "model.safetensors").is_file()

    # Neither secret appears in anything the run wrote or printed.
    for secret in (KEY, "plain-secret-in-config"):
        assert secret not in text
        for f in (tmp_path / "wandb").rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_no_file_the_run_writes_holds_an_environment_secret(tiny_cfg, tmp_path, monkeypatch):
    """A secret resolved from the environment reaches no file of the run: logs, checkpoints, export, report."""
    secret = "tok-" + KEY
    monkeypatch.setenv("MY_API_TOKEN", secret)
    cfg = tiny_cfg(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "+extra.api_token=${oc.env:MY_API_TOKEN}",  # redacted by key name
        "+extra.endpoint='https://h/?k=${oc.env:MY_API_TOKEN}'",  # and by value, inside a longer string
    )
    train(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "hparams.yaml" for p in files)
    leaks = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
