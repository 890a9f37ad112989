"""Run untrusted Python blocks written by the teacher model, one live interpreter per trajectory.

`sandbox.session()` opens a trajectory's session; `await session.run(code, history)` executes one
block and returns what it printed (stdout, then stderr, truncated) plus its exit status; the text
goes back to the model as the executor's output. `Sandbox.run(code, history)` is a session of one
block. Pick a backend with `make_sandbox(kind)`: "auto" takes bubblewrap when it works here,
otherwise the process fallback with a logged warning.

Sessions (flows/execution/session.py)
    * One interpreter per trajectory, started when a block first needs executing, kept up across
      the trajectory's blocks in the same `__main__` globals (and the same workdir), ended with the
      trajectory (`async with sandbox.session() as s`). A value computed once (a time stamp, a
      random draw, a slow import) is what every later block sees; nothing is recomputed.
    * A block's output is its own: fds 1 and 2 point to a fresh pair of pipes for each block and
      to /dev/null between blocks, so what a block's leftover child process writes later goes to a
      pipe nobody reads. A thread a block left running shares fd 1 and writes into whichever
      block runs at the time.
    * A failed block, like a notebook cell, keeps what ran before the error: `b = 2; 1 / 0` leaves
      b. A block that ends the interpreter (wall-time timeout, the output limit, SIGXCPU,
      os._exit, a crash, a kill) leaves nothing: `ExecutionResult.session_lost` says so, and the
      next block finds the session gone.
    * `history` is what the caller expects the session to hold: the earlier blocks that left
      state (succeeded or raised; ToolTeacher keeps that list). When the live interpreter holds
      exactly those, the block runs at once (~0.2 ms for `print(1)`). Otherwise (no interpreter
      yet, blocks answered from the journal, an evicted, timed-out or crashed session) a fresh
      interpreter replays `history` silently, once, with fds 1 and 2 on /dev/null, a replayed
      block that raises being skipped, then goes on live. The replay is bounded by wall_time_s
      and cpu_time_s per replayed block; a block's own clocks start after it. Replaying repeats
      what those blocks did (a new time stamp): it is the rebuild path, not a mode.
    * At most `max_sessions` interpreters stay up (`sandbox.max_sessions` in the recipe, 64 by
      default, ~70 MB resident each with sympy and numpy loaded); starting one more evicts the
      least recently used idle one, whose next block rebuilds it. A session running a block is
      never evicted. At most `max_parallel` blocks run at once per event loop.

Limits, per session and per block
    * the interpreter is `sys.executable -I -S -B -u`: no user site, no PYTHON* variables; the
      bootstrap (bootstrap.py) adds the venv's site-packages (sympy, numpy import) without
      running their .pth files;
    * an empty environment: PATH, HOME, TMPDIR, LANG and one-thread BLAS/OpenMP only, nothing
      of the host's (API keys);
    * per session: address space = memory_mb (big allocations raise MemoryError, the session
      lives on), file size = the workdir size, no core dumps, max_processes (bwrap);
    * per block: CPU time, re-armed before each block at cpu_time_s past what the session used
      (read on the kernel's own clock, an ITIMER_PROF, rounded up to a second): SIGXCPU ends the
      session and the output says "Killed by SIGXCPU: CPU time limit of N s exceeded"; wall time:
      past wall_time_s the session and all it started are killed, and the output ends with
      "TimeoutError: execution exceeded N s wall time";
    * output is read as it comes: past 4 x max_output_chars bytes the session is killed, and the
      text is cut at max_output_chars with a "[output truncated: N more characters]" marker.

The protocol (bootstrap.py). The host hands the interpreter one end of a unix socket pair and the
write end of a control pipe. A frame is a 16-byte header (a random 8-byte token, the code's
length, the CPU seconds to allow) and the code, with the block's two output pipes attached
(SCM_RIGHTS), or none for a silent replay. The bootstrap answers on the control pipe with the
token and a status (0; 1 after an exception, whose traceback it prints; the SystemExit code).
The block runs in the same process as the loop, so it can reach both channels: whatever it does
with them only misleads or breaks its own session. The host reads answers only for the current
token (written in one atomic pipe write), kills a session that floods the control pipe, never
reads the socket, and enforces wall time and the output limit itself; a broken session dies or
times out and is rebuilt for the next block. Blocks compile as "<block k>", k the block's place
among those the session holds; tracebacks show their source lines.

Backends (each in a module of its own)
    * "bwrap" (flows/execution/bwrap.py, bubblewrap >= 0.7): namespaces without network, the
      host filesystem read-only, a private tmpfs workdir, a uid of its own, a process limit;
    * "process" (flows/execution/process.py): the fallback, a child process with the rlimits
      and environment above only: no network isolation, no read-only filesystem, no process
      limit, and the host's processes can be signalled. Use it for development only.
The interface, the limits and the pool of live interpreters are in sandbox_base.py.

Timings (bench/bench_sandbox.py, shared 2-core Debian VM at load ~4, as root): a warm session
runs `print(1)` in 0.22 ms median (process 0.24 ms), against 43 ms for a fresh bwrap
interpreter (process 15 ms). Ten blocks of sympy and numpy work took 0.35 s live against 4.65 s
replayed block by block with bwrap (13.4x; process 0.58 s against 5.34 s, 9.1x); at load ~2,
9.8x and 9.6x.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import subprocess

from flows.execution.bwrap import BwrapSandbox
from flows.execution.process import ProcessSandbox
from flows.execution.sandbox_base import (
    ExecutionResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
)
from flows.execution.session import Session

__all__ = [
    "BwrapSandbox", "ExecutionResult", "ProcessSandbox", "Sandbox", "SandboxLimits", "SandboxUnavailable",
    "Session", "bwrap_available", "make_sandbox",
]

log = logging.getLogger("distillery.sandbox")


def bwrap_available() -> bool:
    """bwrap is installed and a trivial sandboxed snippet runs here (probed once)."""
    return _bwrap_problem() is None


@functools.cache
def _bwrap_problem() -> str | None:
    if shutil.which("bwrap") is None:
        return "the bwrap binary is not on PATH"
    host, child = socket.socketpair()
    control_read, control_write = os.pipe()
    host.close()  # the session reads end-of-channel at once and exits 0
    try:
        with BwrapSandbox(SandboxLimits())._launch(child.fileno(), control_write) as launch:
            probe = subprocess.run(
                launch.argv, env=launch.env, cwd=launch.cwd, pass_fds=(child.fileno(), control_write, *launch.pass_fds),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not run: {exc}"
    finally:
        child.close()
        os.close(control_read)
        os.close(control_write)
    if probe.returncode != 0:
        detail = probe.stderr.decode(errors="replace").strip()[-500:]
        return f"a trivial sandboxed session failed (exit {probe.returncode}): {detail}"
    return None


def make_sandbox(
    kind: str = "auto", limits: SandboxLimits | None = None, max_parallel: int | None = None, max_sessions: int = 64
) -> Sandbox:
    limits = limits or SandboxLimits()
    if kind == "process":
        return ProcessSandbox(limits, max_parallel, max_sessions)
    if kind not in ("auto", "bwrap"):
        raise ValueError(f"unknown sandbox kind {kind!r}; expected 'auto', 'bwrap' or 'process'")
    problem = _bwrap_problem()
    if problem is None:
        return BwrapSandbox(limits, max_parallel, max_sessions)
    if kind == "bwrap":
        raise SandboxUnavailable(
            f"the bubblewrap sandbox does not work here: {problem}. Install it with "
            "`apt-get install -y bubblewrap`; as a non-root user it also needs unprivileged user "
            "namespaces (on Ubuntu >= 23.10: `sysctl kernel.apparmor_restrict_unprivileged_userns=0`). "
            "Or choose the weaker 'process' sandbox explicitly."
        )
    _warn_fallback(problem)
    return ProcessSandbox(limits, max_parallel, max_sessions)


@functools.cache
def _warn_fallback(problem: str) -> None:
    log.warning(
        "bubblewrap unavailable (%s); snippets run in the 'process' fallback sandbox, which has "
        "no network isolation and no read-only filesystem. Install bubblewrap: apt-get install -y bubblewrap",
        problem,
    )
