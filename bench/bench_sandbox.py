"""Benchmark stateful code sessions: sandbox time per block, stateless vs replayed history.

A session is three small blocks as a teacher writes them: block 1 imports math and defines a
function and a variable, block 2 uses them, block 3 prints a result. "stateless" runs each block
alone with an empty history (the behaviour before stateful sessions: blocks 2 and 3 then fail
with a NameError, which costs a traceback); "stateful" runs block k with the k - 1 earlier blocks
as history. Sessions of the two kinds alternate so that load on the machine hits both alike; the
time of a block is the wall time of `await sandbox.run(...)`, one run at a time.

Run: .venv/bin/python bench/bench_sandbox.py [--sessions 30] [--backend auto|bwrap|process|all]
Target (issue 5): stateful / stateless <= 1.5x per block.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from flows.execution.sandbox import Sandbox, SandboxLimits, bwrap_available, make_sandbox

TARGET_RATIO = 1.5
BLOCKS = [
    "import math\n\ndef area(r):\n    return math.pi * r ** 2\n\nradius = 3\nprint(area(radius))\n",
    "areas = [area(r) for r in range(1, radius + 2)]\ntotal = sum(areas)\nprint(round(total, 3))\n",
    "answer = round(total / math.pi)\nprint('answer', answer)\n",
]


async def session(sandbox: Sandbox, stateful: bool) -> list[float]:
    times = []
    for k, block in enumerate(BLOCKS):
        history = BLOCKS[:k] if stateful else ()
        start = time.perf_counter()
        result = await sandbox.run(block, history)
        times.append(time.perf_counter() - start)
        if stateful and result.failed:
            raise SystemExit(f"stateful block {k + 1} failed on {sandbox.name}:\n{result.output}")
    return times


async def measure(sandbox: Sandbox, sessions: int) -> dict[bool, list[list[float]]]:
    await session(sandbox, True)  # warm up: page cache, first-run costs
    await session(sandbox, False)
    runs: dict[bool, list[list[float]]] = {False: [], True: []}
    for i in range(sessions):
        for stateful in ((False, True) if i % 2 == 0 else (True, False)):
            runs[stateful].append(await session(sandbox, stateful))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--backend", default="all", choices=["all", "auto", "bwrap", "process"])
    args = parser.parse_args()
    if args.backend == "all":
        backends = (["bwrap"] if bwrap_available() else []) + ["process"]
    else:
        backends = [make_sandbox(args.backend).name]

    print(f"{args.sessions} sessions of {len(BLOCKS)} blocks per mode, alternating; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; times in ms (median)")
    header = f"{'backend':<8} {'block':>5} {'stateless':>10} {'stateful':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for name in backends:
        sandbox = make_sandbox(name, SandboxLimits(wall_time_s=10.0), max_parallel=1)
        runs = asyncio.run(measure(sandbox, args.sessions))
        for k in range(len(BLOCKS)):
            stateless = statistics.median(times[k] for times in runs[False]) * 1000
            stateful = statistics.median(times[k] for times in runs[True]) * 1000
            print(f"{name:<8} {k + 1:>5} {stateless:>10.1f} {stateful:>10.1f} {stateful / stateless:>5.2f}x")
        stateless = statistics.median(t for times in runs[False] for t in times) * 1000
        stateful = statistics.median(t for times in runs[True] for t in times) * 1000
        ratio = stateful / stateless
        print(f"{name:<8} {'all':>5} {stateless:>10.1f} {stateful:>10.1f} {ratio:>5.2f}x")
        verdicts.append(f"{name}: {ratio:.2f}x {'<=' if ratio <= TARGET_RATIO else '>'} {TARGET_RATIO}x")
    print("target:", "; ".join(verdicts))


if __name__ == "__main__":
    main()
