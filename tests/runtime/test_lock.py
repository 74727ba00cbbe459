"""The run-directory lock: a live owner is refused with one line, a dead one is taken over, a job's ranks share it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from distill.config import ConfigError
from distill.runtime import lock as lock_mod
from distill.runtime.files import host_name
from distill.runtime.lock import ENV_TOKEN, LOCK_NAME, STALE_AFTER_S, acquire, read_owner, run_lock, this_process

ROOT = Path(__file__).resolve().parents[2]
# A process that writes its own lock record into argv[1] (as acquire() does, with the standard library only, so
# it starts in milliseconds), says so, and holds it until it is killed.
HOLDER = """
import json, os, sys, time
stat = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
record = {"pid": os.getpid(), "host": sys.argv[2], "started": "2025-01-01T00:00:00+00:00", "token": "holder",
          "heartbeat": time.time(), "pid_start": int(stat[19]), "job": None, "restart": 0}
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], "run.lock"), "x") as fh:
    json.dump(record, fh)
print("held", flush=True)
time.sleep(600)
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without a lock token (a test process holding one would make its children its ranks)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_TOKEN, "RANK", "LOCAL_RANK", "SLURM_JOB_ID")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), host_name()], stdout=subprocess.PIPE, text=True, env=_env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_lock(run_dir: Path, **fields: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = replace(this_process(), **fields)
    (run_dir / LOCK_NAME).write_text(json.dumps(asdict(owner)))


@pytest.fixture(autouse=True)
def _no_inherited_rank(monkeypatch):
    for key in (ENV_TOKEN, "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)


def test_a_live_owner_is_refused_with_one_line_and_its_lock_taken_over_once_it_is_killed(tmp_path, caplog):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError) as err, run_lock(tmp_path / "run"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock stays behind
        holder.wait()
    message = str(err.value)
    assert "\n" not in message
    assert f"in use by pid {holder.pid} on host {host_name()}, started 2025-01-01T00:00:00+00:00" in message
    assert message.startswith(f"paths.output_dir='{tmp_path / 'run'}'")
    assert f"delete {tmp_path / 'run' / LOCK_NAME}" in message
    assert read_owner(tmp_path / "run" / LOCK_NAME).pid == holder.pid
    with run_lock(tmp_path / "run") as held:
        assert read_owner(tmp_path / "run" / LOCK_NAME).token == held.owner.token
        assert os.environ[ENV_TOKEN] == held.owner.token  # for the ranks this process launches
    assert "its process is gone" in caplog.text
    assert not (tmp_path / "run" / LOCK_NAME).exists() and ENV_TOKEN not in os.environ


def test_a_reused_pid_does_not_keep_a_dead_owners_lock(tmp_path):
    # The pid is alive (this test's parent) but started at another time than the lock says: not the owner.
    _write_lock(tmp_path / "run", pid=os.getppid(), pid_start=1, token="old")
    with run_lock(tmp_path / "run") as held:
        assert held is not None and held.owner.pid == os.getpid()


def test_another_hosts_lock_is_live_until_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path / "run", host="node-b", pid=1, token="b", heartbeat=time.time() - 60)
    with pytest.raises(ConfigError, match=r"in use by pid 1 on host node-b, .* heartbeat 60 s ago"):
        acquire(tmp_path / "run")
    _write_lock(tmp_path / "run", host="node-b", pid=1, token="b", heartbeat=time.time() - STALE_AFTER_S - 1)
    held = acquire(tmp_path / "run")
    held.release()


def test_a_requeued_slurm_job_takes_over_its_earlier_start_and_its_ranks_share_it(tmp_path, monkeypatch):
    # The earlier start ran on another host a moment ago: its heartbeat is fresh, but it is this job's past.
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    _write_lock(tmp_path / "run", host="node-b", pid=7, token="first", job="slurm:42.0", restart=0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with run_lock(tmp_path / "run") as held:
        assert held is not None and held.owner.restart == 1
    # A rank of the running job (same job, same start) shares rank 0's lock without taking it.
    _write_lock(tmp_path / "run", host="node-b", pid=7, token="now", job="slurm:42.0", restart=1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    with run_lock(tmp_path / "run") as held:
        assert held is None
    assert read_owner(tmp_path / "run" / LOCK_NAME).token == "now"
    # Another job's rank refuses the same live lock: its rank 0 will refuse too, so it does not wait for it.
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    with pytest.raises(ConfigError, match=r"job slurm:42.0"), run_lock(tmp_path / "run"):
        pass


def test_ranks_launched_by_the_owner_share_its_lock_and_strangers_are_refused(tmp_path, monkeypatch):
    # The owner is another process of this host (this test's parent stands in for it: alive, not this process).
    _write_lock(tmp_path / "run", pid=os.getppid(), pid_start=None, token="job-a")
    # Lightning starts ranks > 0 from rank 0 with LOCAL_RANK set; they inherit the lock's token.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(ENV_TOKEN, "job-a")
    with run_lock(tmp_path / "run") as held:
        assert held is None
    monkeypatch.delenv(ENV_TOKEN)  # a rank of another job
    with pytest.raises(ConfigError, match=f"in use by pid {os.getppid()}"), run_lock(tmp_path / "run"):
        pass
    assert read_owner(tmp_path / "run" / LOCK_NAME).token == "job-a"


def test_the_owner_refreshes_its_heartbeat(tmp_path, monkeypatch):
    held = acquire(tmp_path / "run", heartbeat_s=0.05)
    try:
        first = read_owner(held.path).heartbeat
        deadline = time.time() + 10
        while read_owner(held.path).heartbeat == first and time.time() < deadline:
            time.sleep(0.05)
        assert read_owner(held.path).heartbeat > first
        assert read_owner(held.path).token == held.owner.token
    finally:
        held.release()
    assert not held.path.exists()


def test_writers_racing_for_a_dead_lock_leave_exactly_one_owner(tmp_path):
    _write_lock(tmp_path / "run", host="node-b", pid=1, token="dead", heartbeat=0.0)
    start, outcomes = threading.Barrier(4), []

    def contender() -> None:
        start.wait()
        try:
            outcomes.append(acquire(tmp_path / "run", this_process()))
        except ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if o != "refused"]
    try:
        assert len(held) == 1 and outcomes.count("refused") == 3
        assert read_owner(tmp_path / "run" / LOCK_NAME).token == held[0].owner.token
    finally:
        for h in held:
            h.release()


def test_an_unreadable_lock_is_respected_until_stale(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("")  # a lock still being written where hard links are missing
    with pytest.raises(ConfigError, match="unreadable lock"):
        acquire(tmp_path / "run")
    old = time.time() - STALE_AFTER_S - 1
    os.utime(tmp_path / "run" / LOCK_NAME, (old, old))
    acquire(tmp_path / "run").release()


def test_dead_reason_by_host_and_pid():
    me = this_process()
    assert lock_mod.dead_reason(me, me) is None  # this very process is alive
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert lock_mod.dead_reason(replace(me, pid=int(gone.stdout)), me) == "its process is gone"


@pytest.mark.ddp
@pytest.mark.slow
def test_train_py_under_ddp_sim_takes_over_a_dead_lock_and_a_second_run_is_refused(tmp_path, cache_dir):
    """Rank 0 takes over a killed run's lock, rank 1 (launched by rank 0) shares it, a second train.py refuses."""
    run = tmp_path / "logs/train/runs/shared"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(run, pid=int(gone.stdout), pid_start=None, token="killed-run")
    paths = [f"paths.cache_dir={cache_dir}", f"data.cache_dir={cache_dir}/data", "callbacks.progress_bar=null"]
    args = ["experiment=smoke", "run_name=shared", "eval.enabled=false", "export.verify=false", *paths]
    cue = tmp_path / "second-run-done"
    pause = ["+callbacks.pause._target_=tests.faults.inject.PauseUntil", f"+callbacks.pause.path={cue}"]
    log = tmp_path / "owner.log"
    with log.open("w") as out:
        owner = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, "trainer=ddp_sim", *pause],
            cwd=tmp_path,
            env=_env(HF_HUB_OFFLINE="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its rank 1 too can be killed at once if the test fails
        )
    try:
        deadline = time.time() + 300
        while "All distributed processes registered" not in log.read_text() and owner.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert owner.poll() is None, log.read_text()[-3000:]  # both ranks run: rank 1 did not refuse
        assert read_owner(run / LOCK_NAME).pid == owner.pid
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            env=_env(HF_HUB_OFFLINE="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert owner.poll() is None  # paused at step 1 until the second run has answered
        cue.touch()
        assert owner.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
    text = log.read_text()
    assert f"taking over the lock of pid {int(gone.stdout)} on host {host_name()}" in text
    assert "its process is gone" in text
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: paths.output_dir='{run}': in use by pid {owner.pid} on host {host_name()}")
    assert (run / "student" / "model.safetensors").is_file() and not (run / LOCK_NAME).exists()
