"""Benchmark the sandbox's live sessions: ten-block trajectories live vs replayed, the per-block
overhead of a warm session, and the memory an idle session holds.

* Trajectories: ten blocks as a tool-using teacher writes them (sympy and numpy imported in the
  first, then small solves, derivatives, sums and linear algebra reusing what came before).
  "live" runs them in one session, each block in the interpreter that ran the earlier ones (what
  ToolTeacher does). "replay" is the behaviour before sessions, and still the rebuild path of a
  lost session: each block runs in a fresh interpreter after a silent replay of the blocks before
  it (`Sandbox.run(code, history)`), so block k costs the k - 1 before it again. The two modes
  alternate trajectory by trajectory so that load on the machine hits both alike; a trajectory's
  time is the sum of its blocks' wall times, one block at a time.
* Overhead: `print(1)` run 200 times in one warm session (median wall time of `session.run`),
  against `print(1)` in a fresh interpreter each time (`Sandbox.run`, 30 times).
* Idle memory: RSS of every process of a session (bwrap's and the interpreter) after the ten
  blocks ran, sympy and numpy loaded, nothing running.

Run: .venv/bin/python bench/bench_sandbox.py [--trajectories 3] [--backend auto|bwrap|process|all]
Targets (issue 25): live >= 5x faster than replay per trajectory; a warm block <= 5 ms median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from flows.execution.sandbox import (
    Sandbox,
    SandboxLimits,
    Session,
    bwrap_available,
    make_sandbox,
)

TARGET_SPEEDUP = 5.0
TARGET_WARM_MS = 5.0
BLOCKS = [
    "import numpy as np\nimport sympy as sp\nx = sp.symbols('x')\nprint(sp.__version__, np.__version__)",
    "roots = sp.solve(sp.Eq(x**2 - 5*x + 6, 0), x)\nprint(roots)",
    "A = np.array([[3.0, 1.0], [1.0, 2.0]])\nb = np.array([9.0, 8.0])\nv = np.linalg.solve(A, b)\nprint(v)",
    "f = sp.sin(x) * sp.exp(x)\nprint(sp.diff(f, x))",
    "area = sp.integrate(x**2, (x, 0, 3))\nprint(area)",
    "grid = np.linspace(0, 1, 1001)\nprint(round(float(np.sum(grid**2) / len(grid)), 4))",
    "n = sp.symbols('n', integer=True, positive=True)\nprint(sp.summation(n**2, (n, 1, 10)))",
    "print(sp.factorint(2**20 - 1))",
    "M = sp.Matrix([[1, 2], [3, 4]])\nprint(M.det(), M.inv())",
    "print('answer', sum(int(r) for r in roots) + int(round(v.sum())) + int(area))",
]
LIMITS = SandboxLimits(wall_time_s=30.0, cpu_time_s=30, memory_mb=1024)


async def live(sandbox: Sandbox) -> tuple[float, int]:
    """Seconds for the ten blocks in one session; and the idle session's RSS in bytes."""
    total, state = 0.0, []
    async with sandbox.session() as session:
        for block in BLOCKS:
            start = time.perf_counter()
            result = await session.run(block, state)
            total += time.perf_counter() - start
            _check(sandbox, "live", block, result.output, result.failed)
            state.append(block)
        assert session.starts == 1, "a live trajectory was rebuilt"
        return total, session_rss(session)


async def replay(sandbox: Sandbox) -> float:
    total = 0.0
    for k, block in enumerate(BLOCKS):
        start = time.perf_counter()
        result = await sandbox.run(block, BLOCKS[:k])
        total += time.perf_counter() - start
        _check(sandbox, "replay", block, result.output, result.failed)
    return total


def _check(sandbox: Sandbox, mode: str, block: str, output: str, failed: bool) -> None:
    if failed:
        raise SystemExit(f"{mode} block failed on {sandbox.name}:\n{block}\n---\n{output}")


async def overhead(sandbox: Sandbox) -> tuple[list[float], list[float]]:
    warm, state = [], ["print(1)"]
    async with sandbox.session() as session:
        await session.run("print(1)")
        for _ in range(200):
            start = time.perf_counter()
            assert (await session.run("print(1)", state)).output == "1\n"
            warm.append(time.perf_counter() - start)
            state.append("print(1)")
        assert session.starts == 1, "the warm session was rebuilt"
    fresh = []
    for _ in range(30):
        start = time.perf_counter()
        assert (await sandbox.run("print(1)")).output == "1\n"
        fresh.append(time.perf_counter() - start)
    return warm, fresh


def session_rss(session: Session) -> int:
    """Resident memory of the session's processes: the launched one and all its descendants."""
    interpreter = session._interpreter
    assert interpreter is not None
    pending, total = [interpreter.process.pid], 0
    while pending:
        pid = pending.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            pending += [int(child) for task in os.listdir(f"/proc/{pid}/task")
                        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


async def measure(sandbox: Sandbox, trajectories: int) -> dict[str, list[float]]:
    await live(sandbox)  # warm up: page cache, first imports
    runs: dict[str, list[float]] = {"live": [], "replay": [], "rss": []}
    for i in range(trajectories):
        for mode in (("live", "replay") if i % 2 == 0 else ("replay", "live")):
            if mode == "live":
                seconds, rss = await live(sandbox)
                runs["live"].append(seconds)
                runs["rss"].append(rss)
            else:
                runs["replay"].append(await replay(sandbox))
    runs["warm"], runs["fresh"] = await overhead(sandbox)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=3)
    parser.add_argument("--backend", default="all", choices=["all", "auto", "bwrap", "process"])
    args = parser.parse_args()
    if args.backend == "all":
        backends = (["bwrap"] if bwrap_available() else []) + ["process"]
    else:
        backends = [make_sandbox(args.backend).name]

    print(f"{args.trajectories} trajectories of {len(BLOCKS)} blocks per mode, alternating; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; medians")
    header = (f"{'backend':<8} {'live s':>7} {'replay s':>9} {'speedup':>8} {'warm ms':>8} {'fresh ms':>9} "
              f"{'idle MB':>8}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for name in backends:
        sandbox = make_sandbox(name, LIMITS, max_parallel=1)
        runs = asyncio.run(measure(sandbox, args.trajectories))
        live_s, replay_s = statistics.median(runs["live"]), statistics.median(runs["replay"])
        warm_ms, fresh_ms = statistics.median(runs["warm"]) * 1000, statistics.median(runs["fresh"]) * 1000
        rss_mb = statistics.median(runs["rss"]) / 2**20
        speedup = replay_s / live_s
        print(f"{name:<8} {live_s:>7.2f} {replay_s:>9.2f} {speedup:>7.1f}x {warm_ms:>8.2f} {fresh_ms:>9.1f} "
              f"{rss_mb:>8.0f}")
        verdicts.append(f"{name}: {speedup:.1f}x {'>=' if speedup >= TARGET_SPEEDUP else '<'} {TARGET_SPEEDUP:.0f}x, "
                        f"warm {warm_ms:.2f} ms {'<=' if warm_ms <= TARGET_WARM_MS else '>'} {TARGET_WARM_MS:.0f} ms")
    print("target:", "; ".join(verdicts))


if __name__ == "__main__":
    main()
