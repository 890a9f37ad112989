"""The bubblewrap backend of the sandbox.

"bwrap" (bubblewrap >= 0.7, `apt-get install -y bubblewrap`); one sandbox per session, for the
session's whole life:
    * new pid, network, IPC and UTS namespaces: no network (a loopback of its own only), no view
      of host processes. When the session's interpreter ends or is killed, everything else in
      its pid namespace dies too, daemons included (`--die-with-parent` if we die);
    * the host filesystem read-only; /run hidden; the workdir is a private 64 MiB tmpfs at /tmp
      (cwd and $HOME), kept across the session's blocks, gone with the session;
    * never root. On a root host bwrap sets up the mounts, then the bootstrap drops to a random
      unused uid without capabilities (no_new_privs is set): such a uid reads only
      world-readable files, and /root is hidden apart from a Python installation living there.
      On a non-root host bwrap uses an unprivileged user namespace, and the code can read
      what the host user can;
    * at most max_processes processes and threads (RLIMIT_NPROC). The kernel counts that limit
      per user; it bounds one session only because each session has a user of its own: the
      random uid, or the fresh user namespace. A fork bomb stops there.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.execution.bootstrap import _WORKDIR_BYTES, _env, _python_argv
from flows.execution.sandbox_base import _DRAIN_GRACE_S, Sandbox, SandboxLimits, _Launch

_SANDBOX_UIDS = (2_000_000_000, 2_100_000_000)  # far above real and container uid ranges


class BwrapSandbox(Sandbox):
    name = "bwrap"

    def __init__(self, limits: SandboxLimits, max_parallel: int | None = None, max_sessions: int = 64) -> None:
        super().__init__(limits, max_parallel, max_sessions)
        self._bwrap = shutil.which("bwrap") or "bwrap"

    @contextmanager
    def _launch(self, chan_fd: int, ctrl_fd: int) -> Iterator[_Launch]:
        info_read, info_write = os.pipe()
        try:
            argv = self._argv(info_write, chan_fd, ctrl_fd)
            yield _Launch(argv, _env(home="/tmp"), cwd="/", pass_fds=(info_write,), info_fd=info_read)
        finally:
            os.close(info_read)
            os.close(info_write)

    async def _reap(self, launch: _Launch) -> None:
        # bwrap exits as soon as the snippet does, while its pid 1 is still being killed (and with
        # it the rest of the pid namespace). Its zombie or absence means the namespace is empty.
        assert launch.info_fd is not None
        os.set_blocking(launch.info_fd, False)
        try:
            init_pid = json.loads(os.read(launch.info_fd, 1 << 16))["child-pid"]
        except (BlockingIOError, ValueError, KeyError):
            return  # the sandbox never started
        deadline = time.monotonic() + _DRAIN_GRACE_S
        while _running(init_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    def _argv(self, info_fd: int, chan_fd: int, ctrl_fd: int) -> list[str]:
        as_root = os.geteuid() == 0
        argv = [
            self._bwrap, "--die-with-parent", "--info-fd", str(info_fd),
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(1 << 20), "--tmpfs", "/run",
            "--perms", "1777", "--size", str(_WORKDIR_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp",
        ]
        hidden = ["/run", "/tmp"]
        if as_root:  # root's home holds credentials; the sandbox uid could not read it anyway
            argv += ["--tmpfs", "/root"]
            hidden.append("/root")
        for path in _python_dirs():
            if any(path.startswith(prefix + "/") for prefix in hidden):
                argv += _reachable_bind(path)
        if as_root:  # keep only what the bootstrap needs to drop to the sandbox uid
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user"]
        uid = str(random.randrange(*_SANDBOX_UIDS)) if as_root else ""
        return argv + ["--", *_python_argv(self.limits, uid=uid, nproc=True, chan_fd=chan_fd, ctrl_fd=ctrl_fd)]


def _python_dirs() -> list[str]:
    """The interpreter's installation and venv, parents first."""
    return sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})


def _reachable_bind(path: str) -> list[str]:
    """Bind `path` (below a hidden top-level directory) read-only, with traversable parents."""
    parts = path.strip("/").split("/")
    parents = ["/" + "/".join(parts[:i]) for i in range(2, len(parts))]  # bwrap would make them 0700
    return [arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)] + ["--ro-bind", path, path]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
