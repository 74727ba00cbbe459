"""One live job per run directory: ``run.lock`` names the process that writes there.

Two jobs with one ``run_name`` (two SLURM jobs, or a re-run while the first is alive) would write the same
checkpoints, logs and export. The first takes ``<run dir>/run.lock`` (pid, host, start time, a heartbeat
it refreshes); a second refuses at start-up with one line naming it. A lock whose owner is dead is taken
over, so a requeued or resumed run (``resume=auto``) goes on. Dead means:

- this host: its pid is not running (or is a zombie, or was reused by a younger process);
- another host (a shared file system): its heartbeat is older than :data:`STALE_AFTER_S`;
- SLURM (or torchrun): the lock of an earlier start of the same job (a requeue: same job, lower restart count).

Every process of one job shares the lock: rank 0 takes it before the others exist (Lightning's launcher
starts them from rank 0, with the lock's token in ``DISTILL_RUN_LOCK``), and ranks started beside it
(``srun``, ``torchrun``) know it by their launcher's job. Ranks other than 0 never take it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path

from distill.config import ConfigError, config_error
from distill.runtime.files import atomic_write_text, host_name, pid_alive, temp_path
from distill.runtime.rank_zero_load import launch_rank

log = logging.getLogger("distill")

LOCK_NAME = "run.lock"
ENV_TOKEN = "DISTILL_RUN_LOCK"  # the lock's token, inherited by the ranks rank 0 launches
HEARTBEAT_S = 30.0  # how often the owner rewrites its heartbeat
STALE_AFTER_S = 300.0  # a lock of another host with no heartbeat for this long is a dead job's


@dataclass(frozen=True)
class Owner:
    """Who holds a run lock."""

    pid: int
    host: str
    started: str  # when the owner started, local time with its offset
    token: str  # unique to this lock: the owner's ranks recognise it
    heartbeat: float  # time.time() of the owner's last refresh
    pid_start: int | None = None  # the pid's start in clock ticks since boot (Linux): tells a reused pid
    job: str | None = None  # the launcher's job, shared by its ranks: "slurm:<job id>.<step id>", "torchrun:..."
    restart: int = 0  # the launcher's restart count: a requeued job starts again with it one higher

    def describe(self) -> str:
        """``pid 123 on host node7, started 2025-01-01T10:00:00+01:00 (job slurm:42.0)``."""
        job = f" (job {self.job})" if self.job else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{job}"


def _pid_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22); None elsewhere."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _job(environ: dict[str, str]) -> tuple[str | None, int]:
    """The launcher's job that every rank of this run shares, and its restart count (None: no such launcher)."""
    if environ.get("SLURM_JOB_ID"):
        job = f"slurm:{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', 'batch')}"
        return job, int(environ.get("SLURM_RESTART_COUNT") or 0)
    if environ.get("TORCHELASTIC_RUN_ID"):
        where = f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}"
        return f"torchrun:{environ['TORCHELASTIC_RUN_ID']}@{where}", int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return None, 0


def this_process(environ: dict[str, str] | None = None) -> Owner:
    """The owner record this process would write."""
    environ = dict(os.environ if environ is None else environ)
    job, restart = _job(environ)
    return Owner(
        pid=os.getpid(),
        host=host_name(),
        started=datetime.now().astimezone().isoformat(timespec="seconds"),
        token=secrets.token_hex(8),
        heartbeat=time.time(),
        pid_start=_pid_start(os.getpid()),
        job=job,
        restart=restart,
    )


def read_owner(lock: Path) -> Owner | None:
    """The lock's owner; None when there is no lock.

    A lock that cannot be parsed (being written where hard links are missing, or edited by hand) reads as
    an owner on an unknown host whose heartbeat is the file's time: it is respected until it is stale.
    """
    try:
        data = json.loads(lock.read_text())  # fields a later version adds are ignored
        return Owner(**{f.name: data[f.name] for f in fields(Owner) if f.name in data})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, OSError):
        try:
            mtime = lock.stat().st_mtime
        except FileNotFoundError:
            return None
        return Owner(pid=-1, host="unknown", started="unknown (unreadable lock)", token="?", heartbeat=mtime)


def same_job(owner: Owner, me: Owner, environ: dict[str, str] | None = None) -> bool:
    """Whether ``owner`` is this process's own job: launched by it (the token), or the same launcher job."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_TOKEN) == owner.token:
        return True
    if (owner.pid, owner.host, owner.pid_start) == (me.pid, me.host, me.pid_start):  # this very process
        return True
    return owner.job is not None and owner.job == me.job and owner.restart == me.restart


def dead_reason(owner: Owner, me: Owner, now: float | None = None) -> str | None:
    """Why the lock's owner counts as dead (see the module's docstring), or None while it is alive."""
    now = time.time() if now is None else now
    if owner.job is not None and owner.job == me.job and owner.restart < me.restart:
        return f"an earlier start of this job (restart {owner.restart})"
    if owner.host == me.host:
        if owner.pid <= 0 or not pid_alive(owner.pid):
            return "its process is gone"
        start = _pid_start(owner.pid)
        if owner.pid_start is not None and start is not None and start != owner.pid_start:
            return "its pid now belongs to another process"
        return None
    if now - owner.heartbeat > STALE_AFTER_S:
        return f"no heartbeat for {now - owner.heartbeat:.0f} s"
    return None


def _refusal(run_dir: Path, lock: Path, owner: Owner, now: float) -> ConfigError:
    return config_error(
        "paths.output_dir",
        str(run_dir),
        f"in use by {owner.describe()}, heartbeat {max(now - owner.heartbeat, 0):.0f} s ago; wait for it to end "
        f"or choose another run_name (if that process is gone, delete {lock})",
    )


class RunLock:
    """The lock this process holds on a run directory, and the thread that refreshes its heartbeat."""

    def __init__(self, path: Path, owner: Owner, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path, self.owner, self.heartbeat_s = path, owner, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)

    def start(self) -> RunLock:
        """Export the token for the ranks this process launches, and start the heartbeat."""
        os.environ[ENV_TOKEN] = self.owner.token
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_owner(self.path)
            if current is None or current.token != self.owner.token:
                holder = current.describe() if current is not None else "nobody"
                log.error(
                    "%s: this run no longer holds its lock (now %s); another job may write here", self.path, holder
                )
                return
            try:
                _write(self.path, replace(self.owner, heartbeat=time.time()))
            except OSError as err:  # a file-system hiccup: the next beat tries again
                log.warning("%s: could not refresh the heartbeat (%s)", self.path, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        current = read_owner(self.path)
        if current is not None and current.token == self.owner.token:
            with suppress(FileNotFoundError):
                self.path.unlink()
        if os.environ.get(ENV_TOKEN) == self.owner.token:
            del os.environ[ENV_TOKEN]


def _write(lock: Path, owner: Owner) -> None:
    atomic_write_text(lock, json.dumps(asdict(owner), indent=1))


def _create(lock: Path, owner: Owner) -> bool:
    """Publish ``owner`` as the lock unless one exists: written whole under a temporary name, then linked."""
    text, tmp = json.dumps(asdict(owner), indent=1), temp_path(lock)
    try:
        tmp.write_text(text)
        os.link(tmp, lock)  # atomic, and fails when the lock exists: a reader never sees a half-written lock
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: create exclusively, then write
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def _break(lock: Path, dead: Owner) -> None:
    """Remove the lock of the dead owner ``dead``, unless another process replaced it since it was read."""
    aside = temp_path(lock, "old")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # another process removed it first
        return
    moved = read_owner(aside)
    if moved is not None and moved.token != dead.token:  # a live lock taken meanwhile: put it back
        try:
            os.link(aside, lock)
        except FileExistsError:
            log.warning("%s: the lock of %s was displaced while taking over a dead one", lock, moved.describe())
    with suppress(FileNotFoundError):
        aside.unlink()


def acquire(run_dir: str | Path, me: Owner | None = None, heartbeat_s: float = HEARTBEAT_S) -> RunLock:
    """Take ``run_dir``'s lock, taking over a dead owner's; a live owner's is refused with one line.

    Raises:
        ConfigError: another live job holds the run directory.

    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, me = run_dir / LOCK_NAME, me or this_process()
    for _ in range(5):
        if _create(lock, me):
            return RunLock(lock, me, heartbeat_s).start()
        owner = read_owner(lock)
        if owner is None:  # released between our attempt and the read
            continue
        reason = dead_reason(owner, me)
        if reason is None:
            raise _refusal(run_dir, lock, owner, time.time())
        log.warning("%s: taking over the lock of %s: %s", lock, owner.describe(), reason)
        _break(lock, owner)
    raise config_error("paths.output_dir", str(run_dir), f"other processes keep taking {lock}; start again")


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[RunLock | None]:
    """Hold ``run_dir``'s lock for the block (rank 0); other ranks of the job only check it.

    Yields the lock this process holds, or None where its job's rank 0 holds it.

    Raises:
        ConfigError: another live job holds the run directory (one line naming its pid, host and start).

    """
    run_dir = Path(run_dir)
    me = this_process()
    owner = read_owner(run_dir / LOCK_NAME)
    if owner is not None and same_job(owner, me):
        yield None
        return
    if launch_rank() != 0:  # started beside rank 0 (srun, torchrun): refuse only another job's live lock
        if owner is not None and dead_reason(owner, me) is None:
            raise _refusal(run_dir, run_dir / LOCK_NAME, owner, time.time())
        yield None
        return
    held = acquire(run_dir, me)
    try:
        yield held
    finally:
        held.release()
