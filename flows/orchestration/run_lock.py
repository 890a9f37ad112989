"""One run per output folder: a lock on `<output_dir>/.distillery/run.lock` from start to publish.

Two runs writing one `output_dir` would each publish every row (composites twice over), so a
run holds an OS lock (`fcntl.flock`) on the folder's lock file for as long as its flow runs:
the flows take it first thing (flows/dualdistill.py, self_distill.py, leakage.py), which
covers `distillery run`, deployments and workers alike. A second run on the folder fails at
once, before any model call, with `RunLocked` naming the holder (pid, host, job, start time,
from the file's JSON body) and what to do.

- The kernel drops the lock when its process ends, however it ends (kill -9 included): a
  lock file whose body names a holder but whose lock is free was left by a dead run; the
  next run takes it over with a warning. The body is emptied when a run ends normally.
- The holder rewrites a heartbeat into the body every `HEARTBEAT_S`. A free lock whose body
  names another host with a fresh heartbeat is refused (a shared folder whose locks do not
  reach across machines); with a heartbeat older than `STALE_AFTER_S` it is taken over.
- Within one process the lock is taken once: `distillery run` takes it with `hand_over`
  before Prefect loads (a second run fails at once), and the flow it then calls re-enters
  it. Any other second taker in the process is refused like another process would be.
- Dask and Ray workers never take it: they run shards (flows/orchestration/on_worker.py)
  under the flow's lock, never a flow.
- A URL `output_dir` is locked in its local mirror (`recipe.state_dir`): runs on one machine
  are kept apart, runs on two machines writing one bucket are not (README, "One run per
  output folder").
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = "run.lock"  # under the state dir; flows/publishing/storage.py keeps it out of a URL's sync
HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 300.0  # another host's free lock with an older heartbeat was left by a dead run

log = logging.getLogger("distillery.run_lock")


class RunLocked(RuntimeError):
    """Another run holds this output folder; the message names it and what to do."""


@dataclass
class _Held:
    fd: int
    body: dict
    entries: int = 1
    hand_over: bool = False  # the next take in this process re-enters (the CLI's flow)
    stop: threading.Event = field(default_factory=threading.Event)


_held: dict[str, _Held] = {}  # lock file (real path) -> what this process holds
_guard = threading.Lock()


@contextmanager
def holding(state_dir: Path, job: str, *, hand_over: bool = False) -> Iterator[None]:
    """Hold the run lock of the output whose state dir is `state_dir` for the block."""
    path = take(state_dir, job, hand_over=hand_over)
    try:
        yield
    finally:
        release(path)


def take(state_dir: Path, job: str, *, hand_over: bool = False) -> str:
    """Take the lock (or re-enter the one this process handed over); returns its key for
    `release`. Raises `RunLocked` when another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(state_dir / LOCK_FILE)
    with _guard:
        held = _held.get(path)
        if held is not None:
            if not held.hand_over:
                raise RunLocked(_message(path, held.body))
            held.entries, held.hand_over = held.entries + 1, False
            return path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _acquire(fd, path)
        except BaseException:
            os.close(fd)
            raise
        body = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                "started_at": _now(), "heartbeat": time.time()}
        _write(fd, body)
        held = _held[path] = _Held(fd, body, hand_over=hand_over)
    threading.Thread(target=_beat, args=(held,), name="run-lock-heartbeat", daemon=True).start()
    return path


def release(path: str) -> None:
    """Leave the lock; the last leaver empties the body and unlocks (the file stays: removing a
    locked file lets two later runs lock two different files)."""
    with _guard:
        held = _held.get(path)
        if held is None:
            return
        held.entries -= 1
        if held.entries > 0:
            return
        del _held[path]
        held.stop.set()
        try:
            os.ftruncate(held.fd, 0)
            fcntl.flock(held.fd, fcntl.LOCK_UN)
        finally:
            os.close(held.fd)


def _acquire(fd: int, path: str) -> None:
    """flock `fd` without waiting; what a previous holder left is judged and warned about."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLocked(_message(path, _read(fd))) from None
    left = _read(fd)
    if not left.get("pid"):
        return  # a run that ended normally, or a new file
    beat_age = time.time() - float(left.get("heartbeat") or 0)
    if left.get("host") != socket.gethostname() and beat_age < STALE_AFTER_S:
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise RunLocked(_message(path, left, f"; its heartbeat is {beat_age:.0f} s old (a run on another machine "
                                             f"sharing this folder: its lock is taken over once the heartbeat is "
                                             f"{STALE_AFTER_S:.0f} s old)"))
    why = (f"its last heartbeat was {beat_age:.0f} s ago" if left.get("host") != socket.gethostname()
           else "that process is gone" if not _alive(int(left["pid"])) else "that pid no longer holds it")
    log.warning("%s: taking over the run lock left by pid %s on %s (job %s, started %s): %s", path,
                left.get("pid"), left.get("host"), left.get("job"), left.get("started_at"), why)


def _message(path: str, body: dict, detail: str = "") -> str:
    output = Path(path).parent.parent
    if not body.get("pid"):
        who = "another run (its lock file names no holder yet)"
    else:
        who = (f"another run: pid {body['pid']} on {body.get('host')}, job {body.get('job')}, "
               f"started {body.get('started_at')}{detail}")
    same_process = body.get("pid") == os.getpid() and body.get("host") == socket.gethostname()
    stop = "" if same_process else f" or stop it (kill {body['pid']} on {body.get('host')})" if body.get("pid") else ""
    return (f"output_dir {output} is in use by {who}. Wait for that run to finish{stop}, then rerun this one "
            f"(it resumes from the journal); or give this run another output_dir. Lock file: {path}")


def _beat(held: _Held) -> None:
    while not held.stop.wait(HEARTBEAT_S):
        with _guard:
            if held.stop.is_set():
                return
            held.body["heartbeat"] = time.time()
            try:
                _write(held.fd, held.body)
            except OSError as exc:  # a full disk must not end the run
                log.warning("run lock heartbeat not written: %s", exc)


def _write(fd: int, body: dict) -> None:
    data = json.dumps(body).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 64 * 1024, 0)
        body = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
