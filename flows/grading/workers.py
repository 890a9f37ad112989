"""Worker processes that run an equivalence function, each key bounded in time (`_Pool`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from flows.grading.compare import Equivalence, Key, Outcome, _run_equivalence

# A plain interpreter, not multiprocessing: nothing re-imports the caller's __main__
# (Prefect scripts, notebooks), and the parent's threads are never forked.
_WORKER_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[3]); "
    "from flows.grading.workers import _worker_main; "
    "_worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)
_READY = "ready"
_WARM_UP = (("1", "1"), ("2x", "x+x"))  # one exact comparison, one by math-verify
_STARTUP_TIMEOUT_S = 120.0


def _worker_main(inbox_fd: int, outbox_fd: int) -> None:
    """Worker loop: receive the equivalence function, then chunks of keys; send one
    outcome per key as soon as it is known, so the parent can tell which key hangs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    equivalence = inbox.recv()
    for answer, gold in _WARM_UP:  # warm up sympy before the clock runs
        _run_equivalence(equivalence, answer, gold)
    outbox.send(_READY)
    while True:
        try:
            chunk = inbox.recv()
        except EOFError:  # the parent closed its end, or exited
            return
        for answer, gold in chunk:
            outbox.send(_run_equivalence(equivalence, answer, gold))


@dataclass
class _Job:
    keys: list[Key]
    done: int  # outcomes received so far
    last_progress: float  # monotonic time of the send or of the last outcome


class _Worker:
    def __init__(self, equivalence: Equivalence) -> None:
        inbox_read, inbox_write = os.pipe()
        outbox_read, outbox_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(inbox_read), str(outbox_write),
             json.dumps(sys.path)],
            pass_fds=(inbox_read, outbox_write),
            stdin=subprocess.DEVNULL,
        )
        os.close(inbox_read)
        os.close(outbox_write)
        self.outbox = Connection(inbox_write, readable=False)
        self.inbox = Connection(outbox_read, writable=False)
        self.outbox.send(equivalence)
        self.job: _Job | None = None

    def wait_ready(self) -> None:
        try:
            if not self.inbox.poll(_STARTUP_TIMEOUT_S) or self.inbox.recv() != _READY:
                raise EOFError
        except (EOFError, OSError):
            self.stop()
            raise RuntimeError(
                f"grader worker failed to start (exit code {self.process.returncode}); "
                "see its stderr"
            ) from None

    def send(self, keys: list[Key]) -> None:
        self.job = _Job(keys, 0, time.monotonic())
        self.outbox.send(keys)

    def receive(self, results: dict[Key, Outcome]) -> None:
        """Store the outcomes that have arrived; EOFError when the worker died."""
        assert self.job is not None
        while self.job.done < len(self.job.keys) and self.inbox.poll():
            results[self.job.keys[self.job.done]] = self.inbox.recv()
            self.job.done += 1
            self.job.last_progress = time.monotonic()
        if self.job.done == len(self.job.keys):
            self.job = None

    def stop(self) -> None:
        """Killed: a worker holds no state, so killing it loses nothing, and an interpreter with
        sympy loaded takes ~0.2 s to exit by itself."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.outbox.close()
        self.inbox.close()


class _Pool:
    """Worker processes running an equivalence function, each key bounded in time."""

    def __init__(self, size: int, timeout_s: float, equivalence: Equivalence) -> None:
        self._size = size
        self._timeout_s = timeout_s
        self._equivalence = equivalence
        self._workers: list[_Worker] = []

    def run(self, keys: list[Key], chunk_size: int) -> dict[Key, Outcome]:
        if not self._workers:
            self._workers = self._start(self._size)
        size = max(1, min(chunk_size, math.ceil(len(keys) / self._size)))
        queue = deque(keys[i : i + size] for i in range(0, len(keys), size))
        try:
            return self._drain(queue)
        except BaseException:
            # Interrupted mid-job: outcomes still in the pipes would answer the next call.
            for worker in self._workers:
                worker.stop()
            self._workers = []
            raise

    def _drain(self, queue: deque[list[Key]]) -> dict[Key, Outcome]:
        results: dict[Key, Outcome] = {}
        tick = min(0.1, self._timeout_s / 4)
        while queue or any(w.job for w in self._workers):
            for worker in self._workers:
                if worker.job is None and queue:
                    worker.send(queue.popleft())
            busy = [w for w in self._workers if w.job]
            wait([w.inbox for w in busy], timeout=tick)
            for worker in busy:
                try:
                    worker.receive(results)
                except (EOFError, OSError):
                    self._replace(worker, queue, results, "grader_crash: worker process died")
                    continue
                if worker.job and time.monotonic() - worker.job.last_progress > self._timeout_s:
                    reason = f"grader_timeout: no result within {self._timeout_s:g} s"
                    self._replace(worker, queue, results, reason)
        return results

    def _replace(
        self, worker: _Worker, queue: deque[list[Key]], results: dict[Key, Outcome], reason: str
    ) -> None:
        """Blame the key the worker was on, restart it, and requeue the rest of its job."""
        assert worker.job is not None
        keys, index = worker.job.keys, worker.job.done
        results[keys[index]] = Outcome(None, reason, "grader_error", "not_needed")
        if index + 1 < len(keys):
            queue.appendleft(keys[index + 1 :])
        worker.stop()
        self._workers[self._workers.index(worker)] = self._start(1)[0]

    def _start(self, count: int) -> list[_Worker]:
        workers = [_Worker(self._equivalence) for _ in range(count)]
        try:
            for worker in workers:  # started together, so they import sympy in parallel
                worker.wait_ready()
        except RuntimeError:
            for worker in workers:
                worker.stop()
            raise
        return workers

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
