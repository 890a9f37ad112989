"""What every sandbox backend shares: the limits (`SandboxLimits`), the result of a block
(`ExecutionResult`), and `Sandbox`, the interface: `session()` opens a trajectory's session
(flows/execution/session.py), `run(code, history)` runs one block in a session of its own. A
backend says how a session's interpreter is launched (`_launch`, a `_Launch`) and how to wait
until nothing of it remains (`_reap`). `Sandbox` also bounds the blocks running at once per
event loop (`max_parallel`) and the interpreters kept alive (`max_sessions`, least recently used
evicted first, `_LivePool`). See flows/execution/sandbox.py for the design.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.execution.session import Session

_DRAIN_GRACE_S = 1.0  # how long to wait for output pipes after a kill


@dataclass(frozen=True)
class SandboxLimits:
    wall_time_s: float = 3.0  # per block
    cpu_time_s: int = 3  # per block
    memory_mb: int = 512  # RLIMIT_AS of the session's interpreter
    max_processes: int = 16  # processes and threads at once (bwrap backend only)
    max_output_chars: int = 2000

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{field} must be positive, got {value}")


@dataclass(frozen=True)
class ExecutionResult:
    output: str  # what the model sees
    exit_code: int | None  # shell-style (128 + signal); None when we killed it
    timed_out: bool
    truncated: bool
    duration_s: float
    session_lost: bool = False  # the block ended its interpreter (timeout, kill, exit): nothing it did remains

    @property
    def failed(self) -> bool:
        return (
            self.timed_out
            or self.exit_code != 0
            or "Traceback (most recent call last)" in self.output
            or "SyntaxError" in self.output
        )


class SandboxUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    info_fd: int | None = None  # read end of bwrap's --info-fd


class Sandbox:
    """Runs blocks in sessions, at most `max_parallel` blocks at once per event loop (default:
    one per CPU), with at most `max_sessions` interpreters alive (idle ones evicted, least
    recently used first). Subclasses decide how an interpreter is launched."""

    name: str = "base"

    def __init__(self, limits: SandboxLimits, max_parallel: int | None = None, max_sessions: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be positive, got {max_sessions}")
        self.limits = limits
        self.max_parallel = max_parallel or os.cpu_count() or 1
        self.max_sessions = max_sessions
        self.live = _LivePool(max_sessions)
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def session(self) -> Session:
        """A trajectory's session: `async with sandbox.session() as s: await s.run(code, history)`."""
        from flows.execution.session import Session

        return Session(self)

    async def run(self, code: str, history: Sequence[str] = ()) -> ExecutionResult:
        """Run `code` alone: in a fresh interpreter, after silently replaying `history` (earlier
        blocks) in its globals. The rebuild path of a session, on its own; teachers use `session()`."""
        async with self.session() as session:
            return await session.run(code, history)

    def run_sync(self, code: str, history: Sequence[str] = ()) -> ExecutionResult:
        return asyncio.run(self.run(code, history))

    def _launch(self, chan_fd: int, ctrl_fd: int) -> AbstractContextManager[_Launch]:
        raise NotImplementedError

    async def _reap(self, launch: _Launch) -> None:
        """Wait, after the launched process ended, until nothing of the session remains."""

    def _slots(self) -> asyncio.Semaphore:
        # One semaphore per event loop: run_sync starts a new loop on every call.
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_parallel)
        return self._semaphores[loop]


class _LivePool:
    """The sessions whose interpreter is alive, least recently used first; thread-safe (shards
    run on several threads, each with its own event loop). A session is busy while it runs a
    block and is never evicted then. Eviction kills the interpreter under the lock, before its
    owner can reap it, so the pid cannot have been reused; the owner notices on its next block."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._order: OrderedDict[Session, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, session: object) -> bool:
        with self._lock:
            return session in self._order

    def use(self, session: Session, busy: bool) -> bool:
        """Mark `session` busy or idle and most recently used; False if it was evicted meanwhile."""
        with self._lock:
            session.busy = busy
            if session in self._order:
                self._order.move_to_end(session)
                return True
            return False

    def admit(self, session: Session) -> None:
        """`session` has a live interpreter now; evict idle ones beyond capacity."""
        with self._lock:
            self._order[session] = None
            excess = len(self._order) - self.capacity
            for victim in [s for s in self._order if not s.busy and s is not session][:max(excess, 0)]:
                del self._order[victim]
                victim._evict()
                self.evictions += 1

    def forget(self, session: Session) -> None:
        """Its interpreter is being closed by its owner: no eviction may touch it from now on."""
        with self._lock:
            self._order.pop(session, None)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _shell_exit_code(returncode: int | None) -> int | None:
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode  # bwrap already reports 128 + signal


def _signal_note(exit_code: int, limits: SandboxLimits) -> str | None:
    try:
        sig = signal.Signals(exit_code - 128) if exit_code > 128 else None
    except ValueError:
        return None
    if sig is None:
        return None
    if sig == signal.SIGXCPU:
        return f"Killed by SIGXCPU: CPU time limit of {limits.cpu_time_s} s exceeded"
    return f"Killed by {sig.name}"


def _truncate(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[:limit] + f"\n... [output truncated: {len(text) - limit} more characters]", True
