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
      PYTHON* variables; the bootstrap below adds the venv's site-packages (sympy, numpy import)
      without running their .pth files, which cost ~30 ms per start here;
    * an empty environment: PATH, HOME, TMPDIR, LANG and one-thread BLAS/OpenMP only, nothing
      of the host's (API keys);
    * rlimits: address space = memory_mb (big allocations raise MemoryError), CPU seconds
      (SIGXCPU, reported in the output), file size = the workdir size, no core dumps;
    * wall time: the snippet and everything it started is killed; the output ends with
      "TimeoutError: execution exceeded N s wall time";
    * output is read as it comes: past 4 x max_output_chars bytes the snippet is killed, and
      the text is cut at max_output_chars with a "[output truncated: N more characters]" marker.

"bwrap" (bubblewrap >= 0.7, `apt-get install -y bubblewrap`)
    * new pid, network, IPC and UTS namespaces: no network (a loopback of its own only), no view
      of host processes. When the snippet's main process ends or is killed, everything else in
      its pid namespace dies too, daemons included (`--die-with-parent` if we die);
    * the host filesystem read-only; /run hidden; the workdir is a private 64 MiB tmpfs at /tmp
      (cwd and $HOME) holding snippet.py, gone with the sandbox;
    * never root. On a root host bwrap sets up the mounts, then the bootstrap drops to a random
      unused uid without capabilities (no_new_privs is set): such a uid reads only
      world-readable files, and /root is hidden apart from a Python installation living there.
      On a non-root host bwrap uses an unprivileged user namespace, and the snippet can read
      what the host user can;
    * at most max_processes processes and threads (RLIMIT_NPROC). The kernel counts that limit
      per user; it bounds one snippet only because each snippet has a user of its own: the
      random uid, or the fresh user namespace. A fork bomb stops there.

"process" (fallback, nothing to install): a child process in its own session with the rlimits
and environment above and a fresh temporary directory as cwd/$HOME, deleted afterwards. It does
NOT give network isolation or a read-only filesystem (the snippet reads and writes whatever the
host user can, the repository included); the host user's other processes, ours included, are
visible (/proc/<pid>/environ holds their environment at start); processes that call setsid()
escape the group kill; and there is no process limit (RLIMIT_NPROC would count all of the host
user's processes, and root ignores it). Use it for development only.

Per-snippet overhead (`print(1)` run 50 times in a row, shared 2-core Debian VM at load ~4,
as root): bwrap ~50 ms median (30 ms best), process ~37 ms median (20 ms best); a bare
`python -I -S -c pass` takes 17 ms there and `python -I` with the venv's .pth files 48 ms.
Replaying the 2 small blocks before the 3rd of a session costs next to nothing: stateful /
stateless per block 1.06x bwrap, 1.00x process (bench/bench_sandbox.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import marshal
import os
import random
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distillery.sandbox")

_WORKDIR_BYTES = 64 << 20
_DRAIN_GRACE_S = 1.0  # how long to wait for output pipes after the kill
_SANDBOX_UIDS = (2_000_000_000, 2_100_000_000)  # far above real and container uid ranges

# Runs first in the fresh interpreter: rlimits, drop to the sandbox uid (root host only),
# add site-packages, replay the history (if any) with fds 1 and 2 on /dev/null, re-arm the CPU
# limit for the new block and tell the parent through the `ready` pipe, then execute the snippet
# as __main__. The excepthook hides this bootstrap's own frame so tracebacks read exactly like
# those of `python snippet.py`; with a history it prints through `traceback` (imported only then)
# so that frames of earlier blocks show their source lines too.
_BOOTSTRAP = """\
import builtins, os, resource, sys
script, uid, site_dirs, history, ready, cpu_time, *limits = sys.argv[1:]
for limit in limits:
    name, _, value = limit.partition("=")
    soft, _, hard = value.partition(":")
    resource.setrlimit(getattr(resource, name), (int(soft), int(hard or soft)))
if uid:
    os.setgroups([])
    os.setresgid(int(uid), int(uid), int(uid))
    os.setresuid(int(uid), int(uid), int(uid))
sys.path.extend(filter(None, site_dirs.split(":")))
sys.argv = [script]
builtins.exit = builtins.quit = sys.exit
blocks = []
def excepthook(kind, exc, tb, default=sys.excepthook):
    tb = tb and tb.tb_next
    if blocks:
        import linecache, traceback
        for name, source in blocks:
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        default = traceback.print_exception
    default(kind, exc.with_traceback(tb), tb)
sys.excepthook = excepthook
namespace = {"__name__": "__main__", "__file__": script, "__builtins__": builtins}
if history:
    import marshal
    os.set_inheritable(int(ready), False)
    with open(history, "rb") as source:
        blocks = [(f"<block {i}>", block) for i, block in enumerate(marshal.load(source), 1)]
    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass
    flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for name, block in blocks:
        try:
            exec(compile(block, name, "exec"), namespace)
        except BaseException:
            pass
    flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in (*saved, devnull):
        os.close(fd)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = -int(-(usage.ru_utime + usage.ru_stime) // 1)
    soft = min(used + int(cpu_time), resource.getrlimit(resource.RLIMIT_CPU)[0])
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    except (ValueError, OSError):
        pass
    try:
        os.write(int(ready), b".")
    finally:
        os.close(int(ready))
with open(script, "rb") as source:
    code = compile(source.read(), script, "exec")
exec(code, namespace)
"""


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


class BwrapSandbox(Sandbox):
    name = "bwrap"

    def __init__(self, limits: SandboxLimits, max_parallel: int | None = None) -> None:
        super().__init__(limits, max_parallel)
        self._bwrap = shutil.which("bwrap") or "bwrap"

    @contextmanager
    def _launch(self, code: str, history: list[str]) -> Iterator[_Launch]:
        snippet = os.memfd_create("snippet")  # bwrap copies it into the sandbox's /tmp
        info_read, info_write = os.pipe()
        fds = [snippet, info_read, info_write]
        try:
            _write_all(snippet, code.encode("utf-8", "replace"))
            os.lseek(snippet, 0, os.SEEK_SET)
            if not history:
                argv = self._argv(snippet, info_write)
                yield _Launch(argv, _env(home="/tmp"), cwd="/", pass_fds=(snippet, info_write), info_fd=info_read)
                return
            replay = os.memfd_create("history")  # copied to /tmp/.history, next to snippet.py
            fds.append(replay)
            _write_all(replay, _history_bytes(history))
            os.lseek(replay, 0, os.SEEK_SET)
            ready_read, ready_write = os.pipe()
            fds += [ready_read, ready_write]
            argv = self._argv(snippet, info_write, history=(replay, ready_write, len(history)))
            yield _Launch(argv, _env(home="/tmp"), cwd="/", pass_fds=(snippet, info_write, replay, ready_write),
                          info_fd=info_read, replays=len(history), ready_fd=ready_read)
        finally:
            for fd in fds:
                os.close(fd)

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

    def _argv(self, snippet_fd: int, info_fd: int, history: tuple[int, int, int] | None = None) -> list[str]:
        """`history`: (memfd holding it, ready pipe's write end, number of blocks)."""
        as_root = os.geteuid() == 0
        argv = [
            self._bwrap, "--die-with-parent", "--info-fd", str(info_fd),
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(1 << 20), "--tmpfs", "/run",
            "--perms", "1777", "--size", str(_WORKDIR_BYTES), "--tmpfs", "/tmp",
            "--perms", "0644", "--file", str(snippet_fd), "/tmp/snippet.py", "--chdir", "/tmp",
        ]
        replay = None
        if history:
            history_fd, ready_fd, replays = history
            argv += ["--perms", "0644", "--file", str(history_fd), "/tmp/.history"]
            replay = ("/tmp/.history", ready_fd, replays)
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
        return argv + ["--", *_python_argv("/tmp/snippet.py", self.limits, uid=uid, nproc=True, history=replay)]


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


def _python_argv(
    script: str, limits: SandboxLimits, uid: str, nproc: bool, history: tuple[str, int, int] | None = None
) -> list[str]:
    """The bootstrap's command line; `history` is (file, ready pipe's write end, number of blocks)."""
    history_file, ready_fd, replays = history or ("", None, 0)
    cpu = limits.cpu_time_s * (1 + replays)  # the bootstrap lowers it to the snippet's own after the replay
    rlimits = {
        "RLIMIT_AS": str(limits.memory_mb << 20),
        "RLIMIT_CPU": f"{cpu}:{cpu + 1}",  # SIGXCPU first, SIGKILL a second later
        "RLIMIT_FSIZE": str(_WORKDIR_BYTES),
        "RLIMIT_CORE": "0",
    }
    if nproc:
        rlimits["RLIMIT_NPROC"] = str(limits.max_processes)
    site_dirs = ":".join(path for path in site.getsitepackages() if os.path.isdir(path))
    replay = [history_file, str(ready_fd), str(limits.cpu_time_s)] if history else ["", "", ""]
    return [sys.executable, "-I", "-S", "-B", "-u", "-c", _BOOTSTRAP, script, uid, site_dirs, *replay,
            *(f"{name}={value}" for name, value in rlimits.items())]


def _history_bytes(history: list[str]) -> bytes:
    # marshal: the bootstrap's interpreter is this one, and it has marshal loaded already (json costs ~20 ms)
    return marshal.dumps([block.encode("utf-8", "replace").decode("utf-8") for block in history])


def _python_dirs() -> list[str]:
    """The interpreter's installation and venv, parents first."""
    return sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})


def _reachable_bind(path: str) -> list[str]:
    """Bind `path` (below a hidden top-level directory) read-only, with traversable parents."""
    parts = path.strip("/").split("/")
    parents = ["/" + "/".join(parts[:i]) for i in range(2, len(parts))]  # bwrap would make them 0700
    return [arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)] + ["--ro-bind", path, path]


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        # Threads count against max_processes; BLAS would otherwise start one per core.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


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
