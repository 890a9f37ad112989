"""The code a session's interpreter runs, and its command line.

`_python_argv` builds `python -I -S -B -u -c <_SESSION> ...`: the bootstrap sets the rlimits,
drops to the sandbox uid (bwrap on a root host), adds the venv's site-packages, points fds 1 and
2 at /dev/null, then serves frames from the host until the channel closes. A frame is a 16-byte
header (an 8-byte token, the code's length, the CPU seconds to allow) and the code; it comes
with two pipe fds, the block's stdout and stderr, or with none for a block replayed silently.
For each frame the bootstrap re-arms the CPU limit (unless the frame says 0), executes the code
in the session's `__main__` globals with fds 1 and 2 on the block's pipes, puts them back on
/dev/null, and answers on the control pipe with the token and a status (0, 1 after an
exception, the SystemExit code). Block k compiles as "<block k>", which tracebacks show with
its source lines. `_env` is the interpreter's whole environment. flows/execution/sandbox.py
describes the design.
"""

from __future__ import annotations

import os
import site
import sys

from flows.execution.sandbox_base import SandboxLimits

_WORKDIR_BYTES = 64 << 20
HEADER_BYTES = 16  # token (8), length of the code (4), CPU seconds to allow from now, 0: as before (4)
STATUS_BYTES = 12  # token (8) + status (4, little-endian, signed)

# The session's loop. It runs on a private copy of the builtins, and binds what it needs before
# any user code runs, so a block that rebinds os.write or builtins.exec breaks only itself. A
# forked child that returns from a block exits there (as it would at the end of a script) instead
# of serving frames too. `report` prints a traceback without the loop's own frame.
_SESSION = """\
import builtins, os, resource, sys, _signal, _socket
uid, site_dirs, chan, ctrl, *limits = sys.argv[1:]
for limit in limits:
    name, _, value = limit.partition("=")
    resource.setrlimit(getattr(resource, name), (int(value), int(value)))
if uid:
    os.setgroups([])
    os.setresgid(int(uid), int(uid), int(uid))
    os.setresuid(int(uid), int(uid), int(uid))
sys.path.extend(filter(None, site_dirs.split(":")))
sys.argv = [""]
builtins.exit = builtins.quit = sys.exit
chan, ctrl = _socket.socket(fileno=int(chan)), int(ctrl)
os.set_inheritable(chan.fileno(), False)
os.set_inheritable(ctrl, False)
main = type(sys)("__main__")
main.__builtins__ = builtins
sys.modules["__main__"] = main
namespace, sources, pid = main.__dict__, {}, os.getpid()
getpid, dup2, close, write, exit_now, open_fd, devnull, blocking, write_only = (
    os.getpid, os.dup2, os.close, os.write, os._exit, os.open, os.devnull, os.set_blocking, os.O_WRONLY)
getrusage, getrlimit, setrlimit, CPU, SELF = (
    resource.getrusage, resource.getrlimit, resource.setrlimit, resource.RLIMIT_CPU, resource.RUSAGE_SELF)
fd_space, fd_flags = _socket.CMSG_SPACE(8), getattr(_socket, "MSG_CMSG_CLOEXEC", 0)
fd_level, fd_kind, byteorder, streams = _socket.SOL_SOCKET, _socket.SCM_RIGHTS, sys.byteorder, sys
getitimer, PROF, FOREVER = _signal.getitimer, _signal.ITIMER_PROF, 1e8
_signal.setitimer(PROF, FOREVER, FOREVER)  # reads the clock RLIMIT_CPU is checked against
started = getrusage(SELF)
started = started.ru_utime + started.ru_stime
__builtins__ = dict(vars(builtins))  # functions defined from here on look names up in this copy
def quiet():
    for stream in (streams.stdout, streams.stderr, streams.__stdout__, streams.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    null = open_fd(devnull, write_only)
    dup2(null, 1)
    dup2(null, 2)
    close(null)
def report(exc):
    import linecache, traceback
    for name, source in sources.items():
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
def run(name, source):
    sources[name] = source
    try:
        exec(compile(source, name, "exec"), namespace)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return (exc.code or 0) & 0xFF
        try:
            print(exc.code, file=streams.stderr)
        except BaseException:
            pass
        return 1
    except BaseException as exc:
        try:
            report(exc)
        except BaseException:
            pass
        return 1
    return 0
def receive(size):
    data = bytearray()
    while len(data) < size:
        chunk = chan.recv(size - len(data))
        if not chunk:
            exit_now(0)
        data += chunk
    return bytes(data)
def frame():
    blocking(chan.fileno(), True)
    header, ancillary, _, _ = chan.recvmsg(16, fd_space, fd_flags)
    if not header:
        exit_now(0)
    fds = [int.from_bytes(data[i:i + 4], byteorder) for level, kind, data in ancillary
           if level == fd_level and kind == fd_kind for i in range(0, len(data) - 3, 4)]
    header += receive(16 - len(header))
    source = receive(int.from_bytes(header[8:12], "little")).decode("utf-8", "replace")
    return header[:8], source, int.from_bytes(header[12:], "little"), fds
def cpu_used():
    remaining, interval = getitimer(PROF)
    if interval == FOREVER:
        return started + FOREVER - remaining
    used = getrusage(SELF)  # the code set the timer itself: the precise clock, a little slower than the kernel's
    return used.ru_utime + used.ru_stime
def serve():
    blocks = 0
    while True:
        token, source, cpu_time, fds = frame()
        blocks += 1
        if len(fds) == 2:
            dup2(fds[0], 1)
            dup2(fds[1], 2)
        for fd in fds:
            close(fd)
        if cpu_time:
            used = -int(-cpu_used() // 1)
            hard = getrlimit(CPU)[1]
            try:
                setrlimit(CPU, (used + cpu_time if hard < 0 else min(used + cpu_time, hard), hard))
            except (ValueError, OSError):
                pass
        status = run(f"<block {blocks}>", source)
        quiet()
        if getpid() != pid:
            exit_now(status)
        write(ctrl, token + status.to_bytes(4, "little", signed=True))
quiet()
serve()
"""


def _python_argv(limits: SandboxLimits, uid: str, nproc: bool, chan_fd: int, ctrl_fd: int) -> list[str]:
    """The session interpreter's command line; it reads frames from `chan_fd` and answers on `ctrl_fd`."""
    rlimits = {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_FSIZE": _WORKDIR_BYTES,
        "RLIMIT_CORE": 0,
    }
    if nproc:
        rlimits["RLIMIT_NPROC"] = limits.max_processes
    site_dirs = ":".join(path for path in site.getsitepackages() if os.path.isdir(path))
    return [sys.executable, "-I", "-S", "-B", "-u", "-c", _SESSION, uid, site_dirs, str(chan_fd), str(ctrl_fd),
            *(f"{name}={value}" for name, value in rlimits.items())]


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
