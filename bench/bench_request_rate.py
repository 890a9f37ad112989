"""Whole-process request rate of `distillery run`, beside a bare aiohttp client, same fake server.

    .venv/bin/python bench/bench_request_rate.py [--problems 10000] [--concurrency 32] [--latency 0.2]
                                                 [--answers] [--detail]

A running `prefect server start` (loopback, its own PREFECT_HOME) and one fake teacher
server in its own process (bench_dualdistill.py's aiohttp `serve`, `--latency` per answer).
Then, in turn:

- bare: a separate process with one aiohttp session per teacher, `--concurrency` requests in
  flight each, sending the same number of requests (2 × problems) and nothing else;
- with `--answers`, our teachers alone: a separate process that answers the same problems
  through the run's own teachers, clients and journal, shard by shard as the flow does, and
  nothing else (no Prefect, grading, stitching or publishing);
- ours: `distillery run` on `--problems` problems × 2 teachers (one request each), the same
  concurrency, from spawning the command to its exit (imports, Prefect, grading, stitching and
  publishing included), and its peak memory.

Each prints its rate as a share of the ideal 2 × concurrency / latency requests per second
(bare and teachers-alone timed inside their process, once set up; ours from spawn to exit).
`--collector as-is frozen off` adds, after ours, one more `distillery run` leg per mode with
Python's garbage collector left as it is, frozen after the flow's imports (`gc.freeze()`), or
off for the whole run, each reporting its collections and the seconds they took: what the
collector costs the run (counterfactuals for measuring; the product sets none of these).
`--warm` first runs `distillery run` on 20 of the problems against the fresh Prefect server,
untimed: the first flow run a server ever sees pays its one-time costs (the flow's record, the
server's first queries), which a long-running server has paid long before.
`--detail` adds where ours loses time: requests sent in each second, the requests the fake
server held in flight per teacher during the first seconds and after (for every leg), the
fake server's own delay in answering (so a slow fake server is not mistaken for a slow client),
and how much CPU time the kernel accounted during ours, per second, as a share of every core's
(a virtual machine paused by its host accounts little or none: no process could run then).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_deployment import start_server  # noqa: E402
from flow_helpers import write_recipe  # noqa: E402

# `python -c` prelude of a --collector leg: argv = mode, stats file, then distillery's own
COLLECTOR_PRELUDE = """
import atexit, gc, json, sys, time
mode, out = sys.argv[1], sys.argv[2]
sys.argv[:3] = ["distillery"]
counts, seconds, began = [0, 0, 0], [0.0, 0.0, 0.0], [0.0]
def watch(phase, info):
    if phase == "start":
        began[0] = time.perf_counter()
    else:
        counts[info["generation"]] += 1
        seconds[info["generation"]] += time.perf_counter() - began[0]
gc.callbacks.append(watch)
atexit.register(lambda: open(out, "w").write(json.dumps({"collections": counts, "seconds": seconds})))
if mode == "off":
    gc.disable()
elif mode == "frozen":
    import flows.dualdistill
    gc.freeze()
from flows.cli import app
app()
"""
RAMP_S = 8.0  # --detail: the run's first seconds, told apart from the steady state
OURS = "distillery run (whole process)"


async def bare_client(base_url: str, problems: list[str], concurrency: int) -> float:
    """Every problem to both 'teachers' with plain aiohttp; returns the wall seconds."""
    import aiohttp

    async def teacher(model: str, system: str) -> None:
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def one(problem: str) -> None:
                body = {"model": model, "messages": [{"role": "system", "content": system},
                                                      {"role": "user", "content": problem}], "n": 1}
                async with limit, session.post(f"{base_url}/chat/completions", json=body) as reply:
                    json.loads(await reply.text())

            await asyncio.gather(*(one(p) for p in problems))

    started = time.perf_counter()
    await asyncio.gather(teacher("fake-model", "You write Python code"), teacher("fake-reasoner", "Think"))
    return time.perf_counter() - started


async def teachers_alone(recipe_path: str) -> float:
    """Every problem answered by the recipe's own teachers, shard by shard as the flow's answer
    stage does, without Prefect or any later stage; returns the wall seconds once set up."""
    from flows.inputs.problem_shards import run_problems
    from flows.stages.shards import answer_shard, shard_name, shards_at_once
    from flows.teachers.runtime import build_runtime
    from schemas.recipe import load_recipe

    recipe = load_recipe(recipe_path, job="dualdistill")
    shards = run_problems(recipe)
    runtime = build_runtime(recipe)

    async def teacher(role: str) -> None:
        window = asyncio.Semaphore(shards_at_once(runtime.problems_in_flight(role), recipe.shard_size))

        async def shard(index: int) -> None:
            async with window:
                await answer_shard(runtime.teacher(role), shards.read(index), shard_name(index),
                                   runtime.problem_slots(role))

        await asyncio.gather(*(shard(index) for index in range(len(shards))))

    started = time.perf_counter()
    await asyncio.gather(teacher("tool"), teacher("reasoning"))
    elapsed = time.perf_counter() - started
    await runtime.aclose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--answers", action="store_true",
                        help="also time our teachers alone (clients and journal, no Prefect or later stage)")
    parser.add_argument("--collector", nargs="+", choices=["as-is", "frozen", "off"], default=[],
                        help="also run ours once per mode of Python's garbage collector (see above)")
    parser.add_argument("--warm", action="store_true",
                        help="run distillery once on 20 problems, untimed, before the legs (see above)")
    parser.add_argument("--detail", action="store_true", help="also print requests sent in each second of the run")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)  # internal: base_url problems.jsonl
    parser.add_argument("--teachers-alone", help=argparse.SUPPRESS)  # internal: recipe.yaml
    args = parser.parse_args()
    if args.bare:
        problems = [json.loads(line)["problem"] for line in Path(args.bare[1]).read_text().splitlines()]
        print(asyncio.run(bare_client(args.bare[0], problems, args.concurrency)))
        return
    if args.teachers_alone:
        print(asyncio.run(teachers_alone(args.teachers_alone)))
        return

    from bench_dualdistill import _set_teacher_options

    requests = 2 * args.problems
    ideal = 2 * args.concurrency / args.latency
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server, api = start_server(tmp_path / "prefect-home")
        problems = tmp_path / "problems.jsonl"
        fake = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bench_dualdistill.py"), "--serve",
                                 str(problems), "--problems", str(args.problems), "--latency", str(args.latency)],
                                stdout=subprocess.PIPE, text=True)
        try:
            base_url = fake.stdout.readline().strip()
            windows: dict[str, tuple[float, float]] = {}  # each leg's wall-clock span, to tell its requests apart
            teacher_options = {"max_concurrency": args.concurrency, "max_retries": 2, "timeout_s": 30}

            def leg_recipe(name: str, source: Path = problems, **overrides) -> Path:
                """A recipe of its own for one leg (its own output folder: its journal starts empty)."""
                path = write_recipe(tmp_path / f"{name}.yaml", source, base_url, tmp_path / f"out-{name}",
                                    run_name=f"bench-rate-{name}", **overrides)
                _set_teacher_options(path, teacher_options)
                return path

            if args.warm:
                few = tmp_path / "warm.jsonl"
                few.write_text("".join(problems.read_text().splitlines(keepends=True)[:20]))
                warm = leg_recipe("warm", few)
                subprocess.run([str(ROOT / ".venv" / "bin" / "distillery"), "run", str(warm)], check=True, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PREFECT_API_URL": api})
            bare_started = time.time()
            bare = subprocess.run([sys.executable, __file__, "--bare", base_url, str(problems), "--concurrency",
                                   str(args.concurrency)], capture_output=True, text=True, check=True)
            windows["bare aiohttp"] = (bare_started, time.time())
            walls = {"bare aiohttp": float(bare.stdout.strip().splitlines()[-1])}
            if args.answers:
                alone = leg_recipe("alone", shard_size=250)
                alone_started = time.time()
                answered = subprocess.run([sys.executable, __file__, "--teachers-alone", str(alone)],
                                          capture_output=True, text=True, check=True, cwd=ROOT)
                windows["our teachers alone"] = (alone_started, time.time())
                walls["our teachers alone"] = float(answered.stdout.strip().splitlines()[-1])
            recipe = leg_recipe("ours", shard_size=250)
            host = HostCpu()
            started = time.time()
            ours = subprocess.Popen([str(ROOT / ".venv" / "bin" / "distillery"), "run", str(recipe)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "PREFECT_API_URL": api}, cwd=ROOT)
            _, status, usage = os.wait4(ours.pid, 0)  # its peak memory (and that of the grader it waited for)
            ended = time.time()
            host.stop()
            if status:
                raise SystemExit(f"distillery run failed: wait status {status}")
            windows[OURS] = (started, ended)
            walls[OURS] = ended - started
            with urllib.request.urlopen(base_url + "/_stats") as reply:  # request arrival times per teacher
                spans = {role: sorted(times) for role, times in json.load(reply).items() if role != "cpu_s"}
            by_leg = {leg: {role: [t for t in times if start <= t < end] for role, times in spans.items()}
                      for leg, (start, end) in windows.items()}
            by_teacher = by_leg[OURS]
            arrivals = sorted(t for times in by_teacher.values() for t in times)
            with urllib.request.urlopen(base_url + "/_late") as reply:  # ours are the last answers
                late = sorted(json.load(reply)[-requests:])
            collected = {}
            for mode in args.collector:  # after ours's figures are read from the fake server
                leg = f"ours, collector {mode}"
                run = leg_recipe(mode, shard_size=250)
                stats = tmp_path / f"gc-{mode}.json"
                leg_started = time.time()
                subprocess.run([sys.executable, "-c", COLLECTOR_PRELUDE, mode, str(stats), "run", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT,
                               env={**os.environ, "PREFECT_API_URL": api})
                walls[leg] = time.time() - leg_started
                collected[leg] = json.loads(stats.read_text())
        finally:
            fake.kill()
            server.terminate()
            server.wait(timeout=30)
    print(f"{requests:,} requests, {args.concurrency} in flight per teacher, {args.latency * 1000:.0f} ms latency: "
          f"ideal {ideal:.0f} req/s")
    for name, wall in walls.items():
        print(f"{name:<32} {wall:7.2f} s  {requests / wall:7.1f} req/s  {requests / wall / ideal:6.1%} of ideal")
    ours_s, bare_s = walls[OURS], walls["bare aiohttp"]
    print(f"ours / bare: {bare_s / ours_s:.3f}; peak RSS of distillery run: {usage.ru_maxrss / 1024:.0f} MB")
    for leg, figures in collected.items():
        counts, seconds = figures["collections"], figures["seconds"]
        print(f"{leg}: / bare {bare_s / walls[leg]:.3f}; collections by generation {counts[0]:,} / {counts[1]:,} / "
              f"{counts[2]:,}, {sum(seconds):.2f} s in all, the full ones {seconds[2]:.2f} s")
    span = arrivals[-1] + args.latency - arrivals[0]
    print(f"ours, decomposed: {arrivals[0] - started:.2f} s to the first request, {span:.2f} s from it to the last "
          f"answer ({requests / span / ideal:.1%} of ideal in that span), {ended - arrivals[-1] - args.latency:.2f} s "
          "after the last answer (grading the last shards, publishing, exit)")
    if args.detail:
        seconds = [0] * (int(arrivals[-1] - arrivals[0]) + 1)
        for arrival in arrivals:
            seconds[int(arrival - arrivals[0])] += 1
        print("requests sent in each second from the first:", " ".join(map(str, seconds)))
        print(f"requests in flight at the fake server (of {args.concurrency} a teacher), in a leg's first "
              f"{RAMP_S:.0f} s (for ours: Prefect's flow start, imports) / after:")
        for leg, teachers in by_leg.items():
            print(f"  {leg:<30} " + ", ".join(
                f"{role} {_in_flight(times, times[0], times[0] + RAMP_S, args.latency):.1f} / "
                f"{_in_flight(times, times[0] + RAMP_S, times[-1], args.latency):.1f}" for role, times in teachers.items()))
        print(f"the fake server's own delay past the latency, ours: mean {1000 * sum(late) / len(late):.1f} ms, "
              f"99th percentile {1000 * late[int(0.99 * len(late))]:.1f} ms; the rest of a request's overhead is in "
              "the client's process, the OS and the fake server's reading of the request")
        print(host.describe())


class HostCpu:
    """Samples /proc/stat while ours runs: the CPU time the kernel accounted (busy, idle and
    waiting alike) per wall second, as a share of every core's, and the share spent in iowait."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            with open("/proc/stat") as stat:
                self.samples.append((time.time(), [int(x) for x in stat.readline().split()[1:9]]))
            if self._stop.wait(0.1):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self) -> str:
        hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        first, last = self.samples[0], self.samples[-1]
        shares, by = [], 0
        for i, (at, fields) in enumerate(self.samples):  # whole seconds
            if at - self.samples[by][0] >= 1.0:
                earlier = self.samples[by]
                shares.append(sum(fields) - sum(earlier[1]))
                shares[-1] /= hz * cores * (at - earlier[0])
                by = i
        total = (sum(last[1]) - sum(first[1])) / (hz * cores * (last[0] - first[0]))
        iowait = (last[1][4] - first[1][4]) / max(1, sum(last[1]) - sum(first[1]))
        lowest = min(shares) if shares else float("nan")
        return (f"the machine's CPU time accounted during ours: {total:.0%} of {cores} cores' (lowest second "
                f"{lowest:.0%}; under ~90% the host paused this machine), iowait {iowait:.1%} of it")


def _in_flight(arrivals: list[float], start: float, end: float, latency: float) -> float:
    """Mean number of requests the server held over [start, end), sampled every 10 ms: those
    that arrived within the last `latency` seconds (each is held that long, plus its delay)."""
    points = [start + i * 0.01 for i in range(int((end - start) / 0.01))]
    held = [bisect.bisect_right(arrivals, at) - bisect.bisect_right(arrivals, at - latency) for at in points]
    return sum(held) / len(held) if held else float("nan")  # nan: a leg shorter than the span asked for


if __name__ == "__main__":
    main()
