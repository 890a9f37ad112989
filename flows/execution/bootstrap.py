"""The code that runs first in a snippet's fresh interpreter, and its command line.

`_python_argv` builds `python -I -S -B -u -c <_BOOTSTRAP> snippet.py ...`: the bootstrap sets
the rlimits, drops to the sandbox uid (bwrap on a root host), adds the venv's site-packages,
replays the history with fds 1 and 2 on /dev/null, re-arms the CPU limit and tells the parent
through the `ready` pipe, then runs the snippet as __main__ (flows/execution/sandbox.py says
why). `_env` is the snippet's whole environment; `_history_bytes` the .history file's content.
"""

from __future__ import annotations

import marshal
import os
import site
import sys

from flows.execution.sandbox_base import SandboxLimits

_WORKDIR_BYTES = 64 << 20

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
