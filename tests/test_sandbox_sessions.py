"""flows/execution/session.py: one live interpreter per trajectory, contained, bounded, rebuilt by replay when lost."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from fake_openai import FakeOpenAIServer, Reply, executor_turns, problem_text
from test_sandbox import SPAWN_CHILD_AND_DAEMON, processes_with

from flows.execution import session as session_module
from flows.execution.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    Session,
    make_sandbox,
)
from flows.inputs.prompts import load_prompt
from flows.models.client import ModelClient
from flows.models.journal import RequestJournal
from flows.models.keys import request_key
from flows.teachers.tool import ToolTeacher
from schemas.records import Problem, Trajectory

BACKENDS = [pytest.param("bwrap", marks=pytest.mark.sandbox), "process"]


def sandbox_of(kind: str, limits: SandboxLimits | None = None, **options) -> Sandbox:
    try:
        return make_sandbox(kind, limits or SandboxLimits(wall_time_s=2.0), **options)
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))


class Notebook:
    """Drives a session the way ToolTeacher does: the blocks that left state are the history."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.state: list[str] = []

    async def run(self, code: str):
        result = await self.session.run(code, self.state)
        if not result.session_lost:
            self.state.append(code)
        return result


def with_notebook(kind: str, body: Callable[[Notebook], Awaitable[None]], **limits) -> None:
    sandbox = sandbox_of(kind, SandboxLimits(**{"wall_time_s": 2.0, **limits}))

    async def go() -> None:
        async with sandbox.session() as session:
            await body(Notebook(session))

    asyncio.run(go())


# --- state, output, failures -----------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_state_lives_across_blocks_without_replay(kind: str) -> None:
    async def body(nb: Notebook) -> None:
        first = await nb.run("import random, time\nstamp = (time.time(), random.random())\nprint('first')")
        assert first.output == "first\n" and nb.session.live
        for k in range(3):
            result = await nb.run(f"print(stamp == stamp, {k})\nprint('err', {k}, file=__import__('sys').stderr)")
            assert result.output == f"True {k}\nerr {k}\n", result.output  # only this block's output
        again = await nb.run("print(stamp)")
        assert again.output == (await nb.run("print(stamp)")).output  # the very same values, never recomputed
        assert nb.session.starts == 1

    with_notebook(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_failed_block_keeps_what_ran_before_the_error(kind: str) -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("a = 1")
        failed = await nb.run("b = 2\nprint('partly')\nc = 1 / 0\nd = 4")
        assert failed.failed and not failed.session_lost and failed.exit_code == 1
        assert failed.output.startswith("partly\nTraceback (most recent call last):\n")
        assert 'File "<block 2>", line 3, in <module>\n    c = 1 / 0' in failed.output
        result = await nb.run("print(a, b, 'c' in globals(), 'd' in globals())")
        assert result.output == "1 2 False False\n" and nb.session.starts == 1

        exited = await nb.run("e = 5\nraise SystemExit(3)")
        assert exited.exit_code == 3 and exited.output == "" and not exited.session_lost
        assert (await nb.run("print(e)")).output == "5\n"

    with_notebook(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_tracebacks_show_the_blocks_they_pass_through(kind: str) -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("def ratio(a, b):\n    return a / b")
        result = await nb.run("print('before')\nratio(1, 0)")
        assert 'File "<block 2>", line 2, in <module>\n    ratio(1, 0)\n' in result.output
        assert 'File "<block 1>", line 2, in ratio\n    return a / b\n' in result.output
        assert "<string>" not in result.output  # the session loop's own frame is hidden
        syntax = await nb.run("y = (1,\nprint(y)")
        assert syntax.failed and 'File "<block 3>", line 1\n' in syntax.output and "SyntaxError" in syntax.output

    with_notebook(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_output_left_behind_by_a_block_stays_out_of_the_next(kind: str) -> None:
    late = ("import subprocess, sys, threading, time\n"
            "child = 'import time; time.sleep(0.3); print(\"late child\", flush=True)'\n"
            "subprocess.Popen([sys.executable, '-c', child])\n"
            "threading.Thread(target=lambda: (time.sleep(0.3), print('late thread')), daemon=True).start()\n"
            "print('started')")

    async def body(nb: Notebook) -> None:
        assert (await nb.run(late)).output == "started\n"
        await asyncio.sleep(0.6)  # the thread prints while no block runs: that goes nowhere
        result = await nb.run("import time\ntime.sleep(0.6)\nprint('next')")
        assert result.output == "next\n", result.output  # the child wrote to a pipe of the first block

    with_notebook(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_workdir_lives_with_the_session(kind: str) -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("open('notes.txt', 'w').write('kept')")
        assert (await nb.run("print(open('notes.txt').read())")).output == "kept\n"

    with_notebook(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_cpu_limit_is_per_block(kind: str) -> None:
    spin = ("import time\ndef spin(seconds):\n    end = time.process_time() + seconds\n"
            "    while time.process_time() < end:\n        pass\n")

    async def body(nb: Notebook) -> None:
        await nb.run(spin)
        for _ in range(3):  # 1.8 s of CPU in all, 0.6 s a block
            assert (await nb.run("spin(0.6)\nprint('ok')")).output == "ok\n"
        result = await nb.run("print('spinning')\nwhile True:\n    pass")
        assert result.output == "spinning\nKilled by SIGXCPU: CPU time limit of 1 s exceeded", result.output
        assert result.session_lost and not result.timed_out
        assert (await nb.run("spin(0.1)\nprint('rebuilt')")).output == "rebuilt\n" and nb.session.starts == 2

    with_notebook(kind, body, wall_time_s=10.0, cpu_time_s=1)


# --- lost sessions are rebuilt by replay ------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_timeout_kills_the_session_and_the_next_block_rebuilds_it(kind: str) -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("x = 42\nprint('replay must stay silent')")
        hung = await nb.run("print('started')\nimport time\ntime.sleep(100)")
        assert hung.timed_out and hung.session_lost and hung.exit_code is None
        assert hung.output == "started\nTimeoutError: execution exceeded 1.0 s wall time"
        assert hung.duration_s < 2.5 and not nb.session.live
        result = await nb.run("print(x)")
        assert result.output == "42\n" and nb.session.starts == 2
        assert (await nb.run("print('live again')")).output == "live again\n" and nb.session.starts == 2

    with_notebook(kind, body, wall_time_s=1.0)


@pytest.mark.parametrize("kind", BACKENDS)
def test_idle_sessions_beyond_max_sessions_are_evicted_and_rebuilt_silently(kind: str) -> None:
    sandbox = sandbox_of(kind, max_sessions=2)

    async def go() -> None:
        sessions = [Notebook(sandbox.session()) for _ in range(3)]
        for i, nb in enumerate(sessions):
            await nb.run(f"value = {i}\nprint('set', value)")
        assert len(sandbox.live) == 2 and sandbox.live.evictions == 1 and not sessions[0].session.live
        result = await sessions[0].run("print('value', value)")
        assert result.output == "value 0\n" and sessions[0].session.starts == 2  # its print was not replayed
        assert not sessions[1].session.live and sessions[2].session.live  # the least recently used went
        for nb in sessions:
            await nb.session.aclose()
        assert len(sandbox.live) == 0

    asyncio.run(go())


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_busy_session_is_never_evicted(kind: str) -> None:
    sandbox = sandbox_of(kind, max_sessions=1)

    async def go() -> None:
        async with sandbox.session() as slow, sandbox.session() as quick:
            running = asyncio.ensure_future(slow.run("import time\ntime.sleep(0.5)\nprint('slow done')"))
            await asyncio.sleep(0.2)
            assert (await quick.run("print('quick')")).output == "quick\n"
            assert (await running).output == "slow done\n" and slow.starts == 1

    asyncio.run(go())


@pytest.mark.parametrize("kind", BACKENDS)
def test_sessions_on_other_threads_share_the_bound(kind: str) -> None:
    sandbox = sandbox_of(kind, max_sessions=2)
    outputs: list[str] = []

    def trajectory(i: int) -> None:
        async def go() -> None:
            async with sandbox.session() as session:
                nb = Notebook(session)
                await nb.run(f"mine = {i}")
                for _ in range(3):
                    outputs.append((await nb.run("print(mine)")).output)

        asyncio.run(go())

    threads = [threading.Thread(target=trajectory, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outputs) == sorted(f"{i}\n" for i in range(4) for _ in range(3))
    assert len(sandbox.live) == 0


# --- isolation and hostile code -----------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_trajectories_never_see_each_other(kind: str) -> None:
    sandbox = sandbox_of(kind)
    probe = ("import os\nprint(sorted(k for k in globals() if not k.startswith('__')), "
             "sorted(f for f in os.listdir('.') if f.endswith('.txt')))")

    async def trajectory(name: str) -> list[str]:
        async with sandbox.session() as session:
            nb = Notebook(session)
            await nb.run(f"{name} = 1\nopen('{name}.txt', 'w').write('x')\nimport time\ntime.sleep(0.2)")
            return [(await nb.run(probe)).output]

    async def go() -> list[list[str]]:
        return await asyncio.gather(trajectory("alpha"), trajectory("beta"))

    alpha, beta = asyncio.run(go())
    assert alpha == ["['alpha', 'os', 'time'] ['alpha.txt']\n"], alpha
    assert beta == ["['beta', 'os', 'time'] ['beta.txt']\n"], beta


# Each probe runs in a live session that holds `x`; the next block must still work, in the same
# interpreter (None) or in a rebuilt one (a number: how many interpreters the session has started).
FDS = "import os\nfds = [int(fd) for fd in os.listdir('/proc/self/fd') if int(fd) > 2]\n"
HOSTILE = {
    "fake-frames": (("import sys\nsys.stdout.buffer.write(bytes(12) + b'\\xff' * 64)\n"
                     "sys.stderr.buffer.write(bytes(16))\nprint('printed')"), None),
    "garbage-on-every-fd": (FDS + "for fd in fds:\n    try:\n        os.write(fd, bytes(12) * 1000)\n"
                            "    except OSError:\n        pass\nprint('wrote')", None),
    "read-the-channel": (FDS + "for fd in fds:\n    os.set_blocking(fd, False)\n    try:\n        os.read(fd, 100)\n"
                         "    except OSError:\n        pass\nprint('read')", None),
    "close-every-fd": (FDS + "for fd in fds:\n    try:\n        os.close(fd)\n    except OSError:\n        pass", 2),
    "dup-over-the-channels": (FDS + "for fd in fds:\n    try:\n        os.dup2(1, fd)\n    except OSError:\n"
                              "        pass", 2),
    "os-exit": ("import os\nos._exit(0)", 2),
    "fork-and-return": ("import os\npid = os.fork()\nprint('forked', pid == 0)", None),
    "infinite-loop": ("while True:\n    pass", 2),
    "huge-output": ("while True:\n    print('y' * 10**6)", 2),
    "memory-bomb": ("hog = bytearray(4 * 1024**3)", None),
    "rebind-the-loop": (("import os, builtins, _socket\nos.write = os.dup2 = _socket.SCM_RIGHTS = None\n"
                         "builtins.exec = builtins.compile = builtins.len = builtins.int = None"), None),
}


@pytest.mark.parametrize("probe", sorted(HOSTILE))
@pytest.mark.parametrize("kind", BACKENDS)
def test_hostile_blocks_stay_contained(kind: str, probe: str) -> None:
    code, starts = HOSTILE[probe]

    async def body(nb: Notebook) -> None:
        await nb.run("x = 'still here'")
        start = time.monotonic()
        result = await nb.run(code)
        assert time.monotonic() - start < 4, result
        after = await nb.run("print(x)")
        assert after.output == "still here\n", (result, after)
        assert nb.session.starts == (starts or 1), (result, after)

    with_notebook(kind, body, wall_time_s=1.5)


@pytest.mark.sandbox
def test_killing_what_it_can_only_ends_its_own_session() -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("x = 1")
        parent = await nb.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert "PermissionError" in parent.output and not parent.session_lost  # pid 1 of its namespace
        everyone = await nb.run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n"
                                "except ProcessLookupError:\n    pass\nprint('survived')")
        assert everyone.output == "survived\n"  # there is no one else in its namespace
        itself = await nb.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        assert itself.session_lost and itself.output == "Killed by SIGKILL"
        assert (await nb.run("print(x)")).output == "1\n" and nb.session.starts == 2

    with_notebook("bwrap", body)


@pytest.mark.sandbox
def test_a_fork_bomb_in_a_session_is_stopped_and_the_session_rebuilt() -> None:
    async def body(nb: Notebook) -> None:
        await nb.run("x = 1")
        bomb = await nb.run("import os\nwhile True:\n    os.fork()")
        assert bomb.failed
        assert (await nb.run("print(x)")).output == "1\n"

    with_notebook("bwrap", body, wall_time_s=3.0, max_processes=16)


@pytest.mark.sandbox
def test_nothing_a_session_started_outlives_it() -> None:
    marker = f"distillery-test-{uuid.uuid4()}"

    async def body(nb: Notebook) -> None:
        assert "alive 2" in (await nb.run(SPAWN_CHILD_AND_DAEMON.format(marker=marker))).output
        assert "alive 2" in (await nb.run("print('alive', alive())")).output  # they live on between blocks

    with_notebook("bwrap", body, wall_time_s=3.0)
    deadline = time.monotonic() + 1.0  # the kernel empties the pid namespace asynchronously
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_with(marker) == []


# --- the tool teacher: a live session per trajectory, journaled -----------------------

PROBLEM = Problem(id="stamp", problem="Print a time stamp, then print it again.", answer="0")
PARAMS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 100, "seed": 0}
STAMP_BLOCKS = ["import time\nstamp = time.time()\nprint(stamp)\ntime.sleep(2)", "print(stamp)", "print(stamp)",
                "print(stamp)"]


def stamp_responder(body: dict) -> Reply:
    turns = executor_turns(body, problem_text(body, [PROBLEM.problem]))
    if turns < len(STAMP_BLOCKS):
        return Reply(content=f"Step {turns}.\n<code>\n{STAMP_BLOCKS[turns]}\n")
    return Reply(content="<answer>\\boxed{0}</answer>")


def stamp_teacher(server: FakeOpenAIServer, tmp_path, kind: str, max_tool_calls: int = 10) -> ToolTeacher:
    journal = RequestJournal(tmp_path / "journal")
    client = ModelClient(model="m", base_url=server.base_url, journal=journal)
    return ToolTeacher(client=client, prompt=load_prompt("tool_teacher"), params=PARAMS,
                       sandbox=sandbox_of(kind, SandboxLimits(wall_time_s=5.0)), journal=journal,
                       max_tool_calls=max_tool_calls)


def solve(teacher: ToolTeacher) -> Trajectory:
    async def go() -> Trajectory:
        try:
            return await teacher.solve(PROBLEM, shard="s0")
        finally:
            await teacher.client.aclose()

    return asyncio.run(go())


def executor_outputs(trajectory: Trajectory) -> list[str]:
    return [trajectory.text[s.start:s.end] for s in trajectory.tool_spans if s.kind == "executor"]


@pytest.fixture
def block_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Session, float]]:
    """Every block a session runs: (its session, its duration)."""
    log: list[tuple[Session, float]] = []
    run = Session.run

    async def logged(self, code, history=()):
        result = await run(self, code, history)
        log.append((self, result.duration_s))
        return result

    monkeypatch.setattr(Session, "run", logged)
    return log


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_slow_first_block_is_paid_once_and_its_stamp_is_kept(tmp_path, kind, block_log, monkeypatch) -> None:
    with FakeOpenAIServer(stamp_responder) as server:
        first = solve(stamp_teacher(server, tmp_path, kind))
    outputs = executor_outputs(first)
    assert len(outputs) == 4 and len(set(outputs)) == 1, outputs  # the same stamp in every block
    assert float(outputs[0].split("\n")[1]) > 1e9
    durations = [duration for _, duration in block_log]
    assert durations[0] >= 2 and all(d < 0.5 for d in durations[1:]), durations  # milliseconds, not 2 s each
    assert {session.starts for session, _ in block_log} == {1} and len({id(s) for s, _ in block_log}) == 1
    assert not block_log[0][0].live  # the session ended with its trajectory

    def no_interpreter(*args, **kwargs):
        raise AssertionError("a rerun must not start an interpreter")

    monkeypatch.setattr(session_module, "_Interpreter", no_interpreter)
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        again = solve(stamp_teacher(dead, tmp_path, kind))
    assert dead.requests == [] and again.text == first.text and again.tool_spans == first.tool_spans


def test_a_trajectory_going_past_its_journal_rebuilds_its_session_once(tmp_path, block_log) -> None:
    with FakeOpenAIServer(stamp_responder) as server:
        limited = solve(stamp_teacher(server, tmp_path, "process", max_tool_calls=2))
        assert limited.finish_reason == "tool_limit" and len(block_log) == 2
        block_log.clear()
        full = solve(stamp_teacher(server, tmp_path, "process", max_tool_calls=10))
    outputs = executor_outputs(full)
    assert outputs[:2] == executor_outputs(limited)  # from the journal
    assert len(block_log) == 2 and block_log[0][0].starts == 1 == block_log[1][0].starts  # one rebuild, then live
    assert block_log[0][1] >= 2 > block_log[1][1]  # the replay of the slow block, silent, once
    assert outputs[2] == outputs[3] and outputs[2].count("\n") == 2  # only the block's own output


def test_the_teacher_keeps_what_a_failed_block_left_and_keys_on_it(tmp_path) -> None:
    blocks = ["a = 1", "b = 2\nraise ValueError('boom')", "print(a + b)"]

    def responder(body: dict) -> Reply:
        turns = executor_turns(body, problem_text(body, [PROBLEM.problem]))
        if turns < len(blocks):
            return Reply(content="", tool_calls=[{"name": "python", "arguments": json.dumps({"code": blocks[turns]})}])
        return Reply(content="<answer>\\boxed{3}</answer>")

    with FakeOpenAIServer(responder) as server:
        teacher = stamp_teacher(server, tmp_path, "process")
        teacher.protocol, teacher.prompt = "function_calling", load_prompt("tool_teacher_functions")
        trajectory = solve(teacher)
    outputs = executor_outputs(trajectory)
    assert "ValueError: boom" in outputs[1] and outputs[2] == "<executor>\n3\n</executor>"
    assert (trajectory.tool_calls, trajectory.tool_errors) == (3, 1)
    limits = dataclasses.asdict(teacher.sandbox.limits)
    unchanged = request_key("exec", {"code": blocks[1], "limits": limits, "history": blocks[:1]})
    after_failure = request_key("exec", {"code": blocks[2], "limits": limits, "history": blocks[:1],
                                         "state": blocks[:2]})
    assert teacher.journal.get(unchanged) is not None and teacher.journal.get(after_failure) is not None
