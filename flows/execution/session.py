"""A trajectory's live interpreter: `Session.run(code, history)` runs one block and returns
only that block's output; the interpreter stays up for the next block.

`history` is what the caller expects the session to hold: the trajectory's earlier blocks that
left state behind. When the live interpreter holds exactly those, the block runs at once. When
there is no interpreter yet (the first block to execute, also after blocks answered from the
journal), when it was evicted, or when it died (a timeout, a crash, os._exit, the output limit,
a CPU kill), a fresh interpreter is started and `history` is replayed into it first, silently,
once; then it goes on live. A block's wall clock starts when it is sent, after any replay; the
replay has wall_time_s and cpu_time_s per replayed block. Limits, isolation and the notes in the
output are the backend's (flows/execution/sandbox.py has the design and the frame protocol).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Self

from flows.execution.bootstrap import HEADER_BYTES, STATUS_BYTES
from flows.execution.sandbox_base import (
    _DRAIN_GRACE_S,
    ExecutionResult,
    Sandbox,
    _kill_group,
    _shell_exit_code,
    _signal_note,
    _truncate,
)

_CONTROL_ABUSE_BYTES = 1 << 20  # a block that floods the control pipe this much is killed
_STARTUP_DIAGNOSTICS = 4096  # bytes of the interpreter's own stderr kept for a failed start


class Session:
    """One trajectory's interpreter, started when a block first needs it. Close it (`async with`,
    or `aclose()`) when the trajectory ends."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.busy = False  # running a block (the pool does not evict it then)
        self.starts = 0  # interpreters started: the first and every rebuild
        self._interpreter: _Interpreter | None = None
        self._one_at_a_time = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def live(self) -> bool:
        """It has an interpreter, neither evicted nor ended."""
        return self._interpreter is not None and self in self.sandbox.live and self._interpreter.alive()

    async def run(self, code: str, history: Sequence[str] = ()) -> ExecutionResult:
        """Run `code` in the interpreter holding `history` (rebuilt by replay if need be)."""
        if isinstance(history, str):
            raise TypeError("history is a sequence of code blocks, not one string")
        history = list(history)
        async with self._one_at_a_time, self.sandbox._slots():
            start = time.monotonic()
            kept = self.sandbox.live.use(self, busy=True)
            try:
                interpreter = self._interpreter
                if interpreter is not None and (not kept or not interpreter.alive() or interpreter.log != history):
                    await self._discard()
                replay: list[str] = []
                if self._interpreter is None:
                    self._interpreter = _Interpreter(self.sandbox)
                    self.starts += 1
                    self.sandbox.live.admit(self)
                    replay = history
                result = await self._execute(code, replay, start)
            except BaseException:
                await self._discard()
                raise
            finally:
                self.sandbox.live.use(self, busy=False)
        if result.session_lost:
            await self._discard()
        return result

    async def aclose(self) -> None:
        await self._discard()

    def _evict(self) -> None:
        """Called by the pool, under its lock, from any thread: end the idle interpreter."""
        if self._interpreter is not None:
            self._interpreter.kill()

    async def _discard(self) -> None:
        interpreter, self._interpreter = self._interpreter, None
        if interpreter is not None:
            self.sandbox.live.forget(self)
            await interpreter.close()

    async def _execute(self, code: str, replay: list[str], start: float) -> ExecutionResult:
        interpreter = self._interpreter
        assert interpreter is not None
        limits = self.sandbox.limits
        if replay:  # the whole replay within wall_time_s and cpu_time_s per block
            deadline = start + limits.wall_time_s * len(replay)
            for k, block in enumerate(replay):
                cpu = 0 if k else limits.cpu_time_s * len(replay)  # 0: leave the CPU limit as it is
                outcome = await interpreter.exchange(block, deadline, cpu, capture=False)
                if outcome.status is None:  # the replay hung or ended the interpreter: the block never ran
                    return await self._result(interpreter, outcome, start)
            interpreter.log = list(replay)
        outcome = await interpreter.exchange(code, time.monotonic() + limits.wall_time_s, limits.cpu_time_s,
                                             capture=True)
        if outcome.status is not None:
            interpreter.log.append(code)
        return await self._result(interpreter, outcome, start)

    async def _result(self, interpreter: _Interpreter, outcome: _Outcome, start: float) -> ExecutionResult:
        limits = self.sandbox.limits
        exit_code = outcome.status
        if exit_code is None:  # the interpreter is lost: end what is left of it, collect the last output
            self.sandbox.live.forget(self)  # before it is reaped: eviction must never signal a reused pid
            await interpreter.finish(outcome)
            exit_code = None if outcome.killed else _shell_exit_code(interpreter.returncode)
        text = outcome.out.decode(errors="replace") + outcome.err.decode(errors="replace")
        if outcome.status is None and not interpreter.answered:
            text += interpreter.diagnostics()
        output, truncated = _truncate(text, limits.max_output_chars)
        truncated = truncated or outcome.overflowed
        notes = []
        if outcome.timed_out:
            notes.append(f"TimeoutError: execution exceeded {limits.wall_time_s} s wall time")
        if outcome.abused:
            notes.append("Killed: the block wrote to the sandbox's control channel")
        if exit_code is not None and (note := _signal_note(exit_code, limits)):
            notes.append(note)
        if notes:
            output = output + ("\n" if output and not output.endswith("\n") else "") + "\n".join(notes)
        return ExecutionResult(output, exit_code, outcome.timed_out, truncated, time.monotonic() - start,
                               session_lost=outcome.status is None)


@dataclass
class _Outcome:
    """How one frame ended: its status, or why none came; and the block's output so far."""

    budget: int  # output bytes still allowed (stdout and stderr together)
    status: int | None = None  # what the bootstrap answered; None: no answer (lost interpreter)
    timed_out: bool = False
    overflowed: bool = False
    abused: bool = False  # the control pipe was flooded
    garbage: int = 0  # bytes on the control pipe that were not this frame's answer
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    pipes: dict[int, bytearray] = field(default_factory=dict)  # open read ends of the block's output
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def killed(self) -> bool:
        return self.timed_out or self.overflowed or self.abused


class _Interpreter:
    """A started session interpreter: its process, its channel (frames in, with the block's
    output pipes), its control pipe (answers out), and the blocks whose state it holds."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.limits = sandbox.limits
        self.sandbox = sandbox
        self.log: list[str] = []  # blocks executed here that left state behind
        self.answered = 0  # frames answered
        self.returncode: int | None = None
        self._reaped = False
        self._control = bytearray()
        self._stack = ExitStack()
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control_read, control_write = os.pipe()
        try:
            self.launch = self._stack.enter_context(sandbox._launch(child.fileno(), control_write))
            launch = self.launch
            self.process = subprocess.Popen(
                launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(child.fileno(), control_write, *launch.pass_fds),
                start_new_session=True,
            )
        except BaseException:
            host.close()
            os.close(control_read)
            self._stack.close()
            raise
        finally:
            child.close()
            os.close(control_write)
        self.channel = host
        self.channel.shutdown(socket.SHUT_RD)  # frames go one way: the interpreter cannot queue data or fds here
        self.channel.setblocking(False)
        self.control = control_read
        os.set_blocking(control_read, False)
        assert self.process.stderr is not None
        os.set_blocking(self.process.stderr.fileno(), False)
        self.exited = os.pidfd_open(self.process.pid)  # readable once the process has ended
        self._stack.callback(os.close, self.exited)
        self._stack.callback(os.close, self.control)
        self._stack.callback(self.channel.close)
        self._stack.callback(self.process.stderr.close)

    def alive(self) -> bool:
        return not select.select([self.exited], [], [], 0)[0]

    def kill(self) -> None:
        if not self._reaped:  # once reaped, the pid may belong to someone else
            _kill_group(self.process.pid)  # bwrap: its sandbox dies with it (--die-with-parent)

    async def exchange(self, code: str, deadline: float, cpu_s: int, capture: bool) -> _Outcome:
        """Send one frame (with output pipes when `capture`; CPU limit `cpu_s` from now, 0: as it
        was) and wait for its answer until `deadline`. Without an answer the interpreter is
        killed; `finish` collects the rest."""
        outcome = _Outcome(budget=self.limits.max_output_chars * 4)
        token = os.urandom(8)
        payload = code.encode("utf-8", "replace")
        header = token + len(payload).to_bytes(4, "little") + cpu_s.to_bytes(4, "little")
        assert len(header) == HEADER_BYTES
        loop = asyncio.get_running_loop()
        sent: list[int] = []
        try:
            if capture:
                for buffer in (outcome.out, outcome.err):
                    read_end, write_end = os.pipe()
                    sent.append(write_end)
                    os.set_blocking(read_end, False)
                    outcome.pipes[read_end] = buffer
                    loop.add_reader(read_end, self._read_output, read_end, outcome)
            loop.add_reader(self.control, self._read_control, token, outcome)
            loop.add_reader(self.exited, outcome.changed.set)
            try:
                await asyncio.wait_for(self._send(header, payload, sent), max(deadline - time.monotonic(), 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it died: the exit shows below
            except TimeoutError:
                outcome.timed_out = True
            finally:
                while sent:  # the interpreter holds its copies now
                    os.close(sent.pop())
            while not outcome.killed and outcome.status is None and self.alive():
                outcome.changed.clear()
                try:
                    await asyncio.wait_for(outcome.changed.wait(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    outcome.timed_out = outcome.status is None and not outcome.killed
            if outcome.status is None and not outcome.killed:  # an answer written just before the end
                self._read_control(token, outcome)
            if outcome.status is not None:  # what the block wrote before answering is in the pipes
                for fd in list(outcome.pipes):
                    self._read_output(fd, outcome, drain=True)
                self._close_pipes(outcome)
        except BaseException:
            self._close_pipes(outcome)
            raise
        finally:
            for fd in sent:
                os.close(fd)
            loop.remove_reader(self.control)
            loop.remove_reader(self.exited)
        if outcome.status is None:
            self.kill()  # a timeout or overflow, or leftovers of an interpreter that ended
        else:
            self.answered += 1
        return outcome

    async def _send(self, header: bytes, payload: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = socket.send_fds(self.channel, [header], fds) if fds else self.channel.send(header)
                break
            except BlockingIOError:  # the interpreter is not reading: only a misbehaving block does that
                writable = asyncio.Event()
                loop.add_writer(self.channel.fileno(), writable.set)
                try:
                    await writable.wait()
                finally:
                    loop.remove_writer(self.channel.fileno())
        await loop.sock_sendall(self.channel, header[sent:] + payload)

    def _read_control(self, token: bytes, outcome: _Outcome) -> None:
        try:
            data = os.read(self.control, 1 << 16)
        except BlockingIOError:
            return
        if not data:  # every writer is gone; the process exit tells the rest
            asyncio.get_running_loop().remove_reader(self.control)
            return
        self._control += data
        at = self._control.find(token)
        if at >= 0 and len(self._control) >= at + STATUS_BYTES:
            outcome.status = int.from_bytes(self._control[at + 8:at + STATUS_BYTES], "little", signed=True)
            del self._control[:at + STATUS_BYTES]
            outcome.changed.set()
        elif at < 0:  # stale answers and garbage: keep only what could start the answer
            outcome.garbage += len(data)
            del self._control[:-(STATUS_BYTES - 1)]
            if outcome.garbage > _CONTROL_ABUSE_BYTES:
                outcome.abused = True
                outcome.changed.set()

    def _read_output(self, fd: int, outcome: _Outcome, drain: bool = False) -> None:
        buffer = outcome.pipes.get(fd)
        while buffer is not None:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
                del outcome.pipes[fd]
                outcome.changed.set()
                return
            buffer += data[:max(outcome.budget, 0)]
            outcome.budget -= len(data)
            if outcome.budget < 0:
                outcome.overflowed = True
                outcome.changed.set()
                return
            if not drain:
                return

    def _close_pipes(self, outcome: _Outcome) -> None:
        loop = asyncio.get_running_loop()
        for fd in list(outcome.pipes):
            loop.remove_reader(fd)
            os.close(fd)
        outcome.pipes.clear()

    async def finish(self, outcome: _Outcome) -> None:
        """After a lost frame: wait until the process ended, then collect the output pipes'
        last bytes until every writer is gone (or a grace period)."""
        try:
            self.kill()
            await self._ended()
            deadline = time.monotonic() + _DRAIN_GRACE_S
            while outcome.pipes and not outcome.overflowed and time.monotonic() < deadline:
                outcome.changed.clear()
                try:
                    await asyncio.wait_for(outcome.changed.wait(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    break
        finally:
            self._close_pipes(outcome)

    async def _ended(self) -> None:
        """Wait for the launched process to end and reap it, then let the backend wait for the rest."""
        if self._reaped:
            return
        loop = asyncio.get_running_loop()
        if self.alive():
            ended = asyncio.Event()
            loop.add_reader(self.exited, ended.set)
            try:
                await asyncio.wait_for(ended.wait(), _DRAIN_GRACE_S)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self.exited)
        if self.returncode is None:
            try:
                self.returncode = self.process.wait(timeout=_DRAIN_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        self._reaped = self.returncode is not None
        await self.sandbox._reap(self.launch)

    def diagnostics(self) -> str:
        """What the interpreter (or bwrap) wrote before it could answer: why it failed to start."""
        assert self.process.stderr is not None
        try:
            data = os.read(self.process.stderr.fileno(), _STARTUP_DIAGNOSTICS)
        except (BlockingIOError, OSError):
            return ""
        return data.decode(errors="replace")

    async def close(self) -> None:
        try:
            self.kill()
            await self._ended()
        finally:
            self._stack.close()
