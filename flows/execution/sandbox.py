"""Run untrusted Python snippets written by the teacher model.

`Sandbox.run(code)` executes one snippet in a fresh interpreter and returns what
`python snippet.py` would have printed (stdout, then stderr, truncated) plus its exit status;
the text goes back to the model as the executor's output. Pick a backend with
`make_sandbox(kind)`: "auto" takes bubblewrap when it works here, otherwise the process
fallback with a logged warning.

Stateful sessions by replay: `run(code, history)` takes the trajectory's earlier blocks that
SUCCEEDED (the caller leaves failed ones out) and executes them first, in order, in the same
interpreter and the same `__main__` globals, so `code` sees the variables, functions, classes and
imports they left. The replay is silent: fds 1 and 2 point to /dev/null meanwhile, so nothing a
replayed block prints, its subprocesses included, reaches the output. A replayed block that raises
(SystemExit too; nondeterminism) is skipped and the replay goes on; one that calls os._exit ends
the run. Limits are those of `code` alone: the parent starts `code`'s wall clock when the bootstrap
reports through a pipe that the replay is done, the whole run being bounded by wall_time_s x
(1 + len(history)) (either timeout reads as usual); the CPU limit is re-armed after the replay at
cpu_time_s past the replay's CPU time rounded up to a whole second, within the same x (1 + n)
bound; only `code`'s output counts and is truncated. The history travels as a second file
(.history, marshal'ed, next to snippet.py); `code` remains snippet.py, so its tracebacks read as
before, and frames of replayed blocks show as File "<block k>" with their source lines. An empty
history runs exactly as before. Replaying costs what the earlier blocks cost again: slow history
makes every later block slow.

Both backends
    * a fresh interpreter per snippet: `sys.executable -I -S -B -u`, so no user site and no
      PYTHON* variables; the bootstrap (bootstrap.py) adds the venv's site-packages (sympy,
      numpy import) without running their .pth files, which cost ~30 ms per start here;
    * an empty environment: PATH, HOME, TMPDIR, LANG and one-thread BLAS/OpenMP only, nothing
      of the host's (API keys);
    * rlimits: address space = memory_mb (big allocations raise MemoryError), CPU seconds
      (SIGXCPU, reported in the output), file size = the workdir size, no core dumps;
    * wall time: the snippet and everything it started is killed; the output ends with
      "TimeoutError: execution exceeded N s wall time";
    * output is read as it comes: past 4 x max_output_chars bytes the snippet is killed, and
      the text is cut at max_output_chars with a "[output truncated: N more characters]" marker.

Backends (each in a module of its own)
    * "bwrap" (flows/execution/bwrap.py, bubblewrap >= 0.7): namespaces without network, the
      host filesystem read-only, a private tmpfs workdir, a uid of its own, a process limit;
    * "process" (flows/execution/process.py): the fallback, a child process with the rlimits
      and environment above only: no network isolation, no read-only filesystem, no process
      limit. Use it for development only.
The interface and the run loop the backends share are in sandbox_base.py, and the bootstrap
that runs first in the snippet's interpreter (rlimits, replay, then the snippet) in bootstrap.py.

Per-snippet overhead (`print(1)` run 50 times in a row, shared 2-core Debian VM at load ~4,
as root): bwrap ~50 ms median (30 ms best), process ~37 ms median (20 ms best); a bare
`python -I -S -c pass` takes 17 ms there and `python -I` with the venv's .pth files 48 ms.
Replaying the 2 small blocks before the 3rd of a session costs next to nothing: stateful /
stateless per block 1.06x bwrap, 1.00x process (bench/bench_sandbox.py).
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess

from flows.execution.bwrap import BwrapSandbox
from flows.execution.process import ProcessSandbox
from flows.execution.sandbox_base import (
    ExecutionResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
)

__all__ = [
    "BwrapSandbox", "ExecutionResult", "ProcessSandbox", "Sandbox", "SandboxLimits", "SandboxUnavailable",
    "bwrap_available", "make_sandbox",
]

log = logging.getLogger("distillery.sandbox")


def bwrap_available() -> bool:
    """bwrap is installed and a trivial sandboxed snippet runs here (probed once)."""
    return _bwrap_problem() is None


@functools.cache
def _bwrap_problem() -> str | None:
    if shutil.which("bwrap") is None:
        return "the bwrap binary is not on PATH"
    with BwrapSandbox(SandboxLimits())._launch("pass", []) as launch:
        try:
            probe = subprocess.run(
                launch.argv, env=launch.env, cwd=launch.cwd, pass_fds=launch.pass_fds,
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap could not run: {exc}"
    if probe.returncode != 0:
        detail = probe.stderr.decode(errors="replace").strip()[-500:]
        return f"a trivial sandboxed snippet failed (exit {probe.returncode}): {detail}"
    return None


def make_sandbox(kind: str = "auto", limits: SandboxLimits | None = None, max_parallel: int | None = None) -> Sandbox:
    limits = limits or SandboxLimits()
    if kind == "process":
        return ProcessSandbox(limits, max_parallel)
    if kind not in ("auto", "bwrap"):
        raise ValueError(f"unknown sandbox kind {kind!r}; expected 'auto', 'bwrap' or 'process'")
    problem = _bwrap_problem()
    if problem is None:
        return BwrapSandbox(limits, max_parallel)
    if kind == "bwrap":
        raise SandboxUnavailable(
            f"the bubblewrap sandbox does not work here: {problem}. Install it with "
            "`apt-get install -y bubblewrap`; as a non-root user it also needs unprivileged user "
            "namespaces (on Ubuntu >= 23.10: `sysctl kernel.apparmor_restrict_unprivileged_userns=0`). "
            "Or choose the weaker 'process' sandbox explicitly."
        )
    _warn_fallback(problem)
    return ProcessSandbox(limits, max_parallel)


@functools.cache
def _warn_fallback(problem: str) -> None:
    log.warning(
        "bubblewrap unavailable (%s); snippets run in the 'process' fallback sandbox, which has "
        "no network isolation and no read-only filesystem. Install bubblewrap: apt-get install -y bubblewrap",
        problem,
    )
