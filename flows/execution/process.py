"""The process backend of the sandbox, the fallback.

"process" (fallback, nothing to install): a child process in its own session with the rlimits
and environment above and a fresh temporary directory as cwd/$HOME, deleted afterwards. It does
NOT give network isolation or a read-only filesystem (the snippet reads and writes whatever the
host user can, the repository included); the host user's other processes, ours included, are
visible (/proc/<pid>/environ holds their environment at start); processes that call setsid()
escape the group kill; and there is no process limit (RLIMIT_NPROC would count all of the host
user's processes, and root ignores it). Use it for development only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from flows.execution.bootstrap import _env, _history_bytes, _python_argv
from flows.execution.sandbox_base import Sandbox, _Launch


class ProcessSandbox(Sandbox):
    name = "process"

    @contextmanager
    def _launch(self, code: str, history: list[str]) -> Iterator[_Launch]:
        workdir = tempfile.mkdtemp(prefix="distillery-snippet-")
        fds: list[int] = []
        try:
            script = os.path.join(workdir, "snippet.py")
            with open(script, "w", encoding="utf-8", errors="replace") as f:
                f.write(code)
            if not history:
                yield _Launch(_python_argv(script, self.limits, uid="", nproc=False), _env(home=workdir), cwd=workdir)
                return
            replay = os.path.join(workdir, ".history")
            with open(replay, "wb") as f:
                f.write(_history_bytes(history))
            ready_read, ready_write = os.pipe()
            fds += [ready_read, ready_write]
            argv = _python_argv(script, self.limits, uid="", nproc=False, history=(replay, ready_write, len(history)))
            yield _Launch(argv, _env(home=workdir), cwd=workdir, pass_fds=(ready_write,),
                          replays=len(history), ready_fd=ready_read)
        finally:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
