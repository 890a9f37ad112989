"""flows/execution/sandbox.py: blocks run isolated, bounded, and their failures become readable output.

Most probes go through `Sandbox.run`, a session of one block (after a silent replay of the
history when given); tests/test_sandbox_sessions.py drives live sessions across blocks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.execution import sandbox as sandbox_module
from flows.execution.sandbox import (
    ExecutionResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    make_sandbox,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = SandboxLimits(wall_time_s=1.0)


def bwrap_sandbox(limits: SandboxLimits = SandboxLimits(wall_time_s=2.0), max_parallel: int | None = None) -> Sandbox:
    try:
        return make_sandbox("bwrap", limits, max_parallel)
    except SandboxUnavailable as exc:  # the reason says how to install it
        pytest.skip(str(exc))


@pytest.fixture
def bwrap() -> Sandbox:
    return bwrap_sandbox()


@pytest.fixture
def process() -> Sandbox:
    return make_sandbox("process", SandboxLimits(wall_time_s=2.0))


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port the host listens on, on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


SPAWN_CHILD_AND_DAEMON = """
import os, subprocess, sys, time
marker = {marker!r}
sleeper = [sys.executable, "-c", "import time; time.sleep(1000)", marker]
subprocess.Popen(sleeper, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:  # a daemon: double fork, new session, no inherited pipes
    os.setsid()
    if os.fork() == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        os.execv(sys.executable, sleeper)
    os._exit(0)

def alive():
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += marker.encode() in open(f"/proc/{{pid}}/cmdline", "rb").read()
        except OSError:
            pass
    return count

deadline = time.time() + 1.0
while alive() < 2 and time.time() < deadline:
    time.sleep(0.02)
print("alive", alive())
"""

SECRET_PROBE = """
import os
print(dict(os.environ))
for pid in ["self", "1", str(os.getppid()), *filter(str.isdigit, os.listdir("/proc"))]:
    try:
        print(pid, open(f"/proc/{pid}/environ", "rb").read())
    except OSError as exc:
        print(pid, type(exc).__name__)
"""


# --- bubblewrap backend ---------------------------------------------------------------


@pytest.mark.sandbox
def test_output_is_stdout_then_stderr(bwrap: Sandbox) -> None:
    result = bwrap.run_sync("import sys\nprint('hello')\nprint(6 * 7)\nprint('careful', file=sys.stderr)")
    assert result.output == "hello\n42\ncareful\n"
    assert (result.exit_code, result.failed, result.timed_out, result.truncated) == (0, False, False, False)


@pytest.mark.sandbox
def test_exception_reads_like_a_script_traceback(bwrap: Sandbox) -> None:
    result = bwrap.run_sync("def f():\n    return 1 / 0\n\nprint('before')\nf()")
    assert result.failed and result.exit_code == 1
    assert result.output.startswith("before\nTraceback (most recent call last):\n")
    assert 'line 2, in f\n    return 1 / 0' in result.output
    assert result.output.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "<string>" not in result.output  # the bootstrap's frame is hidden


@pytest.mark.sandbox
def test_syntax_error(bwrap: Sandbox) -> None:
    result = bwrap.run_sync("x = (1,\nprint(x)")
    assert result.failed and result.exit_code == 1
    assert "SyntaxError" in result.output and "<string>" not in result.output


@pytest.mark.sandbox
def test_venv_packages_import() -> None:
    pytest.importorskip("sympy")
    result = bwrap_sandbox(SandboxLimits(wall_time_s=10.0, cpu_time_s=10)).run_sync("import sympy\nx = sympy.Symbol('x')\nprint(sympy.factor(x**2 - 1))")
    assert result.output == "(x - 1)*(x + 1)\n", result.output


@pytest.mark.sandbox
def test_snippet_is_not_root(bwrap: Sandbox) -> None:
    result = bwrap.run_sync("import os\nprint(os.getuid(), os.geteuid())")
    assert "0" not in result.output.split(), result.output


@pytest.mark.sandbox
@pytest.mark.parametrize("code", ["print('started')\nwhile True:\n    pass", "print('started')\nimport time\ntime.sleep(100)"])
def test_wall_time_limit(code: str) -> None:
    result = bwrap_sandbox(QUICK).run_sync(code)
    assert result.timed_out and result.failed and result.exit_code is None
    assert result.output == "started\nTimeoutError: execution exceeded 1.0 s wall time"
    assert result.duration_s < 2.5


@pytest.mark.sandbox
def test_cpu_time_limit() -> None:
    result = bwrap_sandbox(SandboxLimits(wall_time_s=10.0, cpu_time_s=1)).run_sync("while True:\n    pass")
    assert not result.timed_out and result.failed
    assert result.exit_code == 128 + signal.SIGXCPU
    assert "CPU time limit of 1 s exceeded" in result.output
    assert result.duration_s < 5


@pytest.mark.sandbox
@pytest.mark.parametrize("ending", ["", "while True:\n    pass"], ids=["exits", "times-out"])
def test_nothing_outlives_the_snippet(ending: str) -> None:
    marker = f"distillery-test-{uuid.uuid4()}"
    code = SPAWN_CHILD_AND_DAEMON.format(marker=marker) + ending
    result = bwrap_sandbox(SandboxLimits(wall_time_s=3.0)).run_sync(code)
    assert "alive 2" in result.output, result.output  # both really started
    assert result.timed_out == bool(ending)
    assert processes_with(marker) == []


@pytest.mark.sandbox
def test_memory_limit(bwrap: Sandbox) -> None:
    result = bwrap.run_sync("data = bytearray(2 * 1024**3)\nprint('allocated')")
    assert result.failed and "MemoryError" in result.output and "allocated" not in result.output


@pytest.mark.sandbox
def test_process_limit_stops_a_fork_bomb() -> None:
    limits = SandboxLimits(wall_time_s=3.0, max_processes=16)
    sandbox = bwrap_sandbox(limits)
    counted = sandbox.run_sync(
        "import os, time\nchildren = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        children += 1\n"
        "except OSError as exc:\n    print('children', children, type(exc).__name__)"
    )
    children = int(counted.output.split()[1])
    assert 0 < children < limits.max_processes, counted.output
    assert counted.duration_s < 2  # the sleeping children died with the snippet

    start = time.monotonic()
    bomb = sandbox.run_sync("import os\nwhile True:\n    os.fork()")
    assert bomb.failed and time.monotonic() - start < limits.wall_time_s + 2
    assert sandbox.run_sync("print('still fine')").output == "still fine\n"


@pytest.mark.sandbox
def test_network_is_denied(bwrap: Sandbox, process: Sandbox, listener: int) -> None:
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {listener}), timeout=1)\n    print('connected')\n"
        "except OSError as exc:\n    print('blocked', type(exc).__name__)"
    )
    assert process.run_sync(code).output == "connected\n"  # the listener is reachable from the host
    assert bwrap.run_sync(code).output.startswith("blocked")


@pytest.mark.sandbox
def test_host_environment_is_invisible(bwrap: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cret-{uuid.uuid4()}"
    monkeypatch.setenv("DISTILLERY_TEST_SECRET", secret)
    result = bwrap.run_sync(SECRET_PROBE)
    assert "PATH" in result.output and "\n1 " in result.output  # the probe ran and saw pid 1
    assert secret not in result.output and "DISTILLERY_TEST_SECRET" not in result.output


@pytest.mark.sandbox
def test_writes_outside_the_workdir_fail(bwrap: Sandbox) -> None:
    name = f"sandbox-probe-{uuid.uuid4()}"
    # /var/tmp is world-writable on the host: only the read-only mount stops that write.
    targets = [REPO / name, Path("/etc") / name, Path("/usr/lib") / name, Path("/var/tmp") / name]
    code = "\n".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('wrote')\nexcept OSError as exc:\n    print('denied')"
        for t in targets
    )
    result = bwrap.run_sync(code)
    assert result.output.split() == ["denied"] * len(targets), result.output
    assert not any(t.exists() for t in targets)


@pytest.mark.sandbox
def test_workdir_is_writable_and_thrown_away(bwrap: Sandbox) -> None:
    name = f"notes-{uuid.uuid4()}.txt"
    result = bwrap.run_sync(
        f"import os\nopen({name!r}, 'w').write('kept')\nprint(os.getcwd(), open({name!r}).read())"
    )
    assert result.output == "/tmp kept\n", result.output
    assert not (Path("/tmp") / name).exists()
    listing = bwrap.run_sync("import os\nprint(sorted(os.listdir('.')))").output
    # the next session starts clean: nothing but where the interpreter's own folders are mounted
    # when they live under /tmp (a checkout there: its venv is bound read-only at its own path)
    real = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    mounts = sorted({Path(p).relative_to("/tmp").parts[0] for p in real if p.startswith("/tmp/")})
    assert listing == f"{mounts}\n", listing


@pytest.mark.sandbox
def test_output_is_truncated() -> None:
    sandbox = bwrap_sandbox(SandboxLimits(wall_time_s=3.0, max_output_chars=2000))
    result = sandbox.run_sync("print('x' * 5000)")
    assert result.truncated and result.exit_code == 0
    assert result.output == "x" * 2000 + "\n... [output truncated: 3001 more characters]"

    endless = sandbox.run_sync("while True:\n    print('y' * 10**6)")
    assert endless.truncated and not endless.timed_out and endless.failed
    assert endless.duration_s < 2  # killed for its output, long before the wall time
    assert endless.output.startswith("y" * 2000 + "\n... [output truncated:")


@pytest.mark.sandbox
def test_parallel_runs_are_bounded() -> None:
    sandbox = bwrap_sandbox(SandboxLimits(wall_time_s=3.0), max_parallel=2)

    async def run_all() -> list[ExecutionResult]:
        return await asyncio.gather(*(sandbox.run(f"import time\ntime.sleep(0.15)\nprint({i})") for i in range(10)))

    start = time.monotonic()
    results = asyncio.run(run_all())
    assert [r.output for r in results] == [f"{i}\n" for i in range(10)]
    assert not any(r.failed for r in results)
    assert time.monotonic() - start >= 5 * 0.15  # two at a time


@pytest.mark.sandbox
def test_cancelled_run_leaves_nothing_behind() -> None:
    sandbox = bwrap_sandbox(SandboxLimits(wall_time_s=10.0))
    marker = f"distillery-test-{uuid.uuid4()}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(100)', {marker!r}])"

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(sandbox.run(code))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if processes_with(marker):  # it is running
                break
        assert not task.done() and processes_with(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    deadline = time.monotonic() + 1.0  # the kernel empties the pid namespace asynchronously
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_with(marker) == []


# --- process fallback -----------------------------------------------------------------


def test_process_output_and_traceback(process: Sandbox) -> None:
    assert process.run_sync("print('hi')").output == "hi\n"
    result = process.run_sync("raise ValueError('nope')")
    assert result.failed and "ValueError: nope" in result.output and "<string>" not in result.output


def test_process_timeout_kills_its_children() -> None:
    marker = f"distillery-test-{uuid.uuid4()}"
    result = make_sandbox("process", QUICK).run_sync(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', {marker!r}])\n"
        "print('waiting')\ntime.sleep(100)"
    )
    assert result.timed_out and result.output.startswith("waiting\nTimeoutError: execution exceeded 1.0 s")
    assert processes_with(marker) == []


def test_process_environment_is_empty(process: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_TEST_SECRET", "s3cret")
    result = process.run_sync("import os\nprint(sorted(os.environ))")
    assert "DISTILLERY_TEST_SECRET" not in result.output and "HOME" in result.output


def test_process_workdir_is_removed(process: Sandbox) -> None:
    result = process.run_sync("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = Path(result.output.strip())
    assert workdir.name.startswith("distillery-session-") and not workdir.exists()


def test_process_output_is_truncated() -> None:
    result = make_sandbox("process", SandboxLimits(max_output_chars=100)).run_sync("print('z' * 250)")
    assert result.truncated and result.output.endswith("[output truncated: 151 more characters]")


# --- rebuilding a session: `run(code, history)` replays the history silently, then runs code ---

BACKENDS = [pytest.param("bwrap", marks=pytest.mark.sandbox), "process"]


def sandbox_of(kind: str, limits: SandboxLimits = SandboxLimits(wall_time_s=2.0)) -> Sandbox:
    return bwrap_sandbox(limits) if kind == "bwrap" else make_sandbox("process", limits)


SPIN = (
    "import time\ndef spin(seconds):\n    end = time.process_time() + seconds\n"
    "    while time.process_time() < end:\n        pass\n"
)


@pytest.mark.parametrize("kind", BACKENDS)
def test_state_carries_across_blocks(kind: str) -> None:
    history = [
        "import math\ntotal = 40\n",
        "def hypot(a, b):\n    return math.sqrt(a * a + b * b)\n\n"
        "class Counter:\n    def __init__(self):\n        self.n = total\n",
        "total += 2\nimport collections as co\n",
    ]
    code = "c = Counter()\nprint(hypot(3, 4), c.n, total, co.Counter('aab')['a'], math.pi > 3)"
    result = sandbox_of(kind).run_sync(code, history)
    assert result.output == "5.0 42 42 2 True\n", result.output
    assert (result.exit_code, result.failed, result.timed_out, result.truncated) == (0, False, False, False)


@pytest.mark.parametrize("kind", BACKENDS)
def test_replay_is_silent(kind: str) -> None:
    history = [
        "import os, subprocess, sys\nprint('replayed stdout')\nprint('replayed stderr', file=sys.stderr)\n"
        "sys.stdout.write('no newline')\nos.write(1, b'raw fd 1\\n')\nos.write(2, b'raw fd 2\\n')\n",
        "os.system('echo from the shell; echo shell stderr >&2')\n"
        "subprocess.run([sys.executable, '-c', 'import sys; print(1); print(2, file=sys.stderr)'])\n"
        "print('z' * 100_000)\nvalue = 7\n",
    ]
    sandbox = sandbox_of(kind, SandboxLimits(wall_time_s=3.0, max_output_chars=100))
    result = sandbox.run_sync("import sys\nprint('new', value)\nprint('careful', file=sys.stderr)", history)
    assert result.output == "new 7\ncareful\n", result.output  # nor is the replay's output counted against the limit
    assert not result.truncated and not result.failed


@pytest.mark.parametrize("kind", BACKENDS)
def test_only_the_given_history_is_replayed(kind: str) -> None:
    sandbox = sandbox_of(kind)
    ok, broken = "a = 1\n", "b = 2\nc = 1 / 0\n"
    assert not sandbox.run_sync(ok).failed and sandbox.run_sync(broken).failed
    result = sandbox.run_sync("print(a)\nprint(b)", history=[ok])  # the caller passes successful blocks only
    assert result.failed and result.output.startswith("1\nTraceback (most recent call last):\n")
    assert result.output.rstrip().endswith("NameError: name 'b' is not defined")


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_replayed_block_that_raises_is_skipped(kind: str) -> None:
    history = ["x = 1\n", "x += 1\nraise SystemExit(3)\n", "x += 10\ny = 1 / 0\n", "import sys\nx += 100\nsys.exit(0)\n",
               "raise KeyboardInterrupt\n", "x += 1000\n", "this is not python\n"]
    result = sandbox_of(kind).run_sync("print(x)\nprint('y' in globals())", history)
    assert result.output == "1112\nFalse\n", result.output
    assert result.exit_code == 0 and not result.failed


@pytest.mark.parametrize("kind", BACKENDS)
def test_slow_history_does_not_use_up_the_wall_time(kind: str) -> None:
    sandbox = sandbox_of(kind, QUICK)
    history = ["import time\ntime.sleep(0.6)\n", "time.sleep(0.6)\nslept = 2\n"]
    result = sandbox.run_sync("time.sleep(0.5)\nprint('slept', slept)", history)
    assert result.output == "slept 2\n" and not result.timed_out and not result.failed, result

    result = sandbox.run_sync("print('started')\ntime.sleep(100)", history)
    assert result.timed_out and result.failed and result.exit_code is None
    assert result.output == "started\nTimeoutError: execution exceeded 1.0 s wall time"
    assert 2.0 < result.duration_s < 4.0  # the replay, then the block's own second


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_hanging_replay_times_out_as_usual(kind: str) -> None:
    result = sandbox_of(kind, QUICK).run_sync("print('never')", ["print('replay')\nwhile True:\n    pass\n"])
    assert result.timed_out and result.failed and result.exit_code is None
    assert result.output == "TimeoutError: execution exceeded 1.0 s wall time"
    assert result.duration_s < 3.5  # bounded by wall_time_s x (1 + len(history))


@pytest.mark.parametrize("kind", BACKENDS)
def test_cpu_limit_applies_to_the_block_after_a_heavy_replay(kind: str) -> None:
    sandbox = sandbox_of(kind, SandboxLimits(wall_time_s=10.0, cpu_time_s=1))
    history = [SPIN + "spin(0.8)\n", "spin(0.8)\n"]
    result = sandbox.run_sync("spin(0.6)\nprint('done')", history)  # 2.2 s of CPU in all
    assert result.output == "done\n" and not result.failed, result.output

    result = sandbox.run_sync("print('spinning')\nwhile True:\n    pass", history)
    assert not result.timed_out and result.failed
    assert result.exit_code == 128 + signal.SIGXCPU
    assert result.output == "spinning\nKilled by SIGXCPU: CPU time limit of 1 s exceeded"
    assert result.duration_s < 9  # by the CPU limit, before the 10 s wall time (2.6 s of CPU, a busy host)


@pytest.mark.parametrize("kind", BACKENDS)
def test_traceback_shows_the_new_block(kind: str) -> None:
    history = ["def ratio(a, b):\n    return a / b\n"]
    result = sandbox_of(kind).run_sync("print('before')\nx = 1\nratio(x, 0)", history)
    assert result.failed and result.exit_code == 1
    output = result.output
    assert output.startswith("before\nTraceback (most recent call last):\n")
    assert 'File "<block 2>", line 3, in <module>\n    ratio(x, 0)\n' in output
    assert 'File "<block 1>", line 2, in ratio\n    return a / b\n' in output
    assert output.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "<string>" not in output  # the bootstrap's frame is hidden

    syntax = sandbox_of(kind).run_sync("y = (1,\nprint(y)", history)
    assert syntax.failed and "SyntaxError" in syntax.output and "<string>" not in syntax.output
    assert 'File "<block 2>", line 1\n' in syntax.output


@pytest.mark.parametrize("kind", BACKENDS)
def test_nothing_started_by_the_replay_outlives_the_run(kind: str) -> None:
    marker = f"distillery-test-{uuid.uuid4()}"
    history = [
        "import os, subprocess, sys, time\n"
        f"marker = {marker!r}\n"
        "def alive():\n"
        "    count = 0\n"
        "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "        try:\n"
        "            count += marker.encode() in open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "        except OSError:\n"
        "            pass\n"
        "    return count\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', marker])\n"
        "deadline = time.time() + 1.0\n"
        "while not alive() and time.time() < deadline:\n"
        "    time.sleep(0.02)\n"
    ]
    result = sandbox_of(kind).run_sync("print(alive() == 1)", history)
    assert result.output == "True\n", result.output  # the replayed block's child was running
    deadline = time.monotonic() + 1.0
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_with(marker) == []


@pytest.mark.sandbox
def test_replay_runs_with_the_same_isolation(listener: int) -> None:
    history = [
        "import os, socket\nuid = os.getuid()\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {listener}), timeout=1)\n    net = 'connected'\n"
        "except OSError:\n    net = 'blocked'\n"
    ]
    result = bwrap_sandbox().run_sync("print(uid != 0, net)", history)
    assert result.output == "True blocked\n", result.output


# --- choosing a backend ---------------------------------------------------------------


def test_missing_bwrap_is_explained_or_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sandbox_module, "_bwrap_problem", lambda: "the bwrap binary is not on PATH")
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        make_sandbox("bwrap")
    sandbox_module._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="distillery.sandbox"):
        assert make_sandbox("auto").name == "process"
    assert "bubblewrap unavailable" in caplog.text


def test_auto_prefers_bwrap() -> None:
    expected = "bwrap" if sandbox_module.bwrap_available() else "process"
    assert make_sandbox("auto").name == expected


def test_bad_kind_and_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sandbox kind"):
        make_sandbox("docker")
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)


@pytest.mark.parametrize(
    ("output", "exit_code", "timed_out", "failed"),
    [("ok\n", 0, False, False), ("", 1, False, True), ("", None, True, True),
     ("Traceback (most recent call last):\n", 0, False, True), ("SyntaxError: x\n", 0, False, True)],
)
def test_failed(output: str, exit_code: int | None, timed_out: bool, failed: bool) -> None:
    assert ExecutionResult(output, exit_code, timed_out, False, 0.1).failed is failed
