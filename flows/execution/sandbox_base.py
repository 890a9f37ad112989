"""What every sandbox backend shares: the limits (`SandboxLimits`), the result of a run
(`ExecutionResult`), and `Sandbox`, the interface whose `run` launches a snippet the way its
backend says (`_launch`, a `_Launch`) and then watches it: the wall clock (the replay's and the
snippet's), the output budget, the kill of its process group, the exit status and the notes
the model reads ("TimeoutError: …", "Killed by SIGXCPU: …"). See flows/execution/sandbox.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

_DRAIN_GRACE_S = 1.0  # how long to wait for output pipes after the kill


@dataclass(frozen=True)
class SandboxLimits:
    wall_time_s: float = 3.0
    cpu_time_s: int = 3
    memory_mb: int = 512  # RLIMIT_AS of the snippet's interpreter
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
    replays: int = 0  # blocks of history replayed before the snippet
    ready_fd: int | None = None  # read end of the pipe the bootstrap writes to once the replay is done


class Sandbox:
    """Runs snippets, at most `max_parallel` at once per event loop (default: one per CPU).

    Subclasses decide how the interpreter is launched.
    """

    name: str = "base"

    def __init__(self, limits: SandboxLimits, max_parallel: int | None = None) -> None:
        self.limits = limits
        self.max_parallel = max_parallel or os.cpu_count() or 1
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def run(self, code: str, history: Sequence[str] = ()) -> ExecutionResult:
        """Run `code` after silently replaying `history` (earlier blocks that succeeded) in its globals."""
        if isinstance(history, str):
            raise TypeError("history is a sequence of code blocks, not one string")
        history = list(history)
        async with self._slots():
            with self._launch(code, history) as launch:
                return await self._execute(launch)

    def run_sync(self, code: str, history: Sequence[str] = ()) -> ExecutionResult:
        return asyncio.run(self.run(code, history))

    def _launch(self, code: str, history: list[str]) -> AbstractContextManager[_Launch]:
        raise NotImplementedError

    async def _reap(self, launch: _Launch) -> None:
        """Wait, after the launched process ended, until nothing of the snippet remains."""

    def _slots(self) -> asyncio.Semaphore:
        # One semaphore per event loop: run_sync starts a new loop on every call.
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_parallel)
        return self._semaphores[loop]

    async def _execute(self, launch: _Launch) -> ExecutionResult:
        limits = self.limits
        start = time.monotonic()
        transport, collector = await asyncio.get_running_loop().subprocess_exec(
            lambda: _Collector(budget=limits.max_output_chars * 4), *launch.argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=launch.env, cwd=launch.cwd, pass_fds=launch.pass_fds, start_new_session=True,
        )
        try:
            try:
                ended = {collector.exited, collector.overflowed}
                if launch.ready_fd is None:
                    await asyncio.wait(ended, timeout=limits.wall_time_s, return_when=asyncio.FIRST_COMPLETED)
                else:  # the whole run within wall x (1 + replays); the snippet's own clock starts after the replay
                    deadline = start + limits.wall_time_s * (1 + launch.replays)
                    with _signalled(launch.ready_fd) as ready:
                        await asyncio.wait(ended | {ready}, timeout=deadline - time.monotonic(),
                                           return_when=asyncio.FIRST_COMPLETED)
                        if ready.done() and not any(future.done() for future in ended):
                            await asyncio.wait(ended, timeout=min(limits.wall_time_s, deadline - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            finally:  # on timeout, overflow or cancellation: everything; after a normal exit: leftovers
                killed = not collector.exited.done()
                _kill_group(transport.get_pid())
            # Let buffered output arrive; a process that left the group (process backend) may hold the pipes.
            await asyncio.wait({collector.closed}, timeout=_DRAIN_GRACE_S)
        finally:
            transport.close()
        await self._reap(launch)
        duration = time.monotonic() - start

        timed_out = killed and not collector.overflowed.done()
        exit_code = None if killed else _shell_exit_code(transport.get_returncode())
        output, truncated = _truncate(collector.text(), limits.max_output_chars)
        truncated = truncated or collector.overflowed.done()
        notes = []
        if timed_out:
            notes.append(f"TimeoutError: execution exceeded {limits.wall_time_s} s wall time")
        if exit_code is not None and (note := _signal_note(exit_code, limits)):
            notes.append(note)
        if notes:
            output = output + ("\n" if output and not output.endswith("\n") else "") + "\n".join(notes)
        return ExecutionResult(output, exit_code, timed_out, truncated, duration)


class _Collector(asyncio.SubprocessProtocol):
    """Keeps at most `budget` bytes of stdout and stderr, and tells when the process exits."""

    def __init__(self, budget: int) -> None:
        loop = asyncio.get_running_loop()
        self.budget = budget
        self.received = {1: bytearray(), 2: bytearray()}
        self.exited = loop.create_future()  # the main process ended (its children may live on)
        self.overflowed = loop.create_future()
        self.closed = loop.create_future()  # exited and every pipe closed

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.received[fd] += data[: max(self.budget, 0)]
        self.budget -= len(data)
        if self.budget < 0 and not self.overflowed.done():
            self.overflowed.set_result(None)

    def process_exited(self) -> None:
        self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)

    def text(self) -> str:
        return self.received[1].decode(errors="replace") + self.received[2].decode(errors="replace")


@contextmanager
def _signalled(fd: int) -> Iterator[asyncio.Future[None]]:
    """A future done once something was written to the pipe whose read end is `fd`."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loop.remove_reader(fd)
        if data and not future.done():
            future.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        yield future
    finally:
        loop.remove_reader(fd)
        future.cancel()


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
