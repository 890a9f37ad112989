"""The process backend of the sandbox, the fallback.

"process" (fallback, nothing to install): the session's interpreter is a child process in its own
session with the rlimits and environment of flows/execution/sandbox.py and a fresh temporary
directory as cwd/$HOME, kept across the session's blocks and deleted with it. It does NOT give
network isolation or a read-only filesystem (the code reads and writes whatever the host user
can, the repository included); the host user's other processes, ours included, are visible
(/proc/<pid>/environ holds their environment at start) and can be signalled; processes that call
setsid() escape the group kill; and there is no process limit (RLIMIT_NPROC would count all of
the host user's processes, and root ignores it). Use it for development only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from flows.execution.bootstrap import _env, _python_argv
from flows.execution.sandbox_base import Sandbox, _Launch


class ProcessSandbox(Sandbox):
    name = "process"

    @contextmanager
    def _launch(self, chan_fd: int, ctrl_fd: int) -> Iterator[_Launch]:
        workdir = tempfile.mkdtemp(prefix="distillery-session-")
        try:
            argv = _python_argv(self.limits, uid="", nproc=False, chan_fd=chan_fd, ctrl_fd=ctrl_fd)
            yield _Launch(argv, _env(home=workdir), cwd=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
