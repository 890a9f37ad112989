"""Whole-process request rate of `distillery run`, beside a bare aiohttp client, same fake server.

    .venv/bin/python bench/bench_request_rate.py [--problems 10000] [--concurrency 32] [--latency 0.2]

A running `prefect server start` (loopback, its own PREFECT_HOME) and one fake teacher
server in its own process (bench_dualdistill.py's aiohttp `serve`, `--latency` per answer).
Then, in turn:

- bare: a separate process with one aiohttp session per teacher, `--concurrency` requests in
  flight each, sending the same number of requests (2 × problems) and nothing else;
- ours: `distillery run` on `--problems` problems × 2 teachers (one request each), the same
  concurrency, from spawning the command to its exit (imports, Prefect, grading, stitching and
  publishing included), and its peak memory.

Each prints its rate as a share of the ideal 2 × concurrency / latency requests per second.
`--detail` adds where ours loses time: requests sent in each second, the requests the fake
server held in flight per teacher during the first seconds and after, and the fake server's
own delay in answering (so a slow fake server is not mistaken for a slow client).
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
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_deployment import start_server  # noqa: E402
from flow_helpers import write_recipe  # noqa: E402

RAMP_S = 8.0  # --detail: the run's first seconds, told apart from the steady state


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--detail", action="store_true", help="also print requests sent in each second of the run")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)  # internal: base_url problems.jsonl
    args = parser.parse_args()
    if args.bare:
        problems = [json.loads(line)["problem"] for line in Path(args.bare[1]).read_text().splitlines()]
        print(asyncio.run(bare_client(args.bare[0], problems, args.concurrency)))
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
            bare = subprocess.run([sys.executable, __file__, "--bare", base_url, str(problems), "--concurrency",
                                   str(args.concurrency)], capture_output=True, text=True, check=True)
            bare_s = float(bare.stdout.strip().splitlines()[-1])
            recipe = write_recipe(tmp_path / "r.yaml", problems, base_url, tmp_path / "out", shard_size=250,
                                  run_name="bench-rate")
            _set_teacher_options(recipe, {"max_concurrency": args.concurrency, "max_retries": 2, "timeout_s": 30})
            started = time.time()
            ours = subprocess.Popen([str(ROOT / ".venv" / "bin" / "distillery"), "run", str(recipe)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "PREFECT_API_URL": api}, cwd=ROOT)
            _, status, usage = os.wait4(ours.pid, 0)  # its peak memory (and that of the grader it waited for)
            ended = time.time()
            if status:
                raise SystemExit(f"distillery run failed: wait status {status}")
            ours_s = ended - started
            with urllib.request.urlopen(base_url + "/_stats") as reply:  # request arrival times per teacher
                by_teacher = {role: sorted(t for t in times if t >= started)
                              for role, times in json.load(reply).items() if role != "cpu_s"}
            arrivals = sorted(t for times in by_teacher.values() for t in times)
            with urllib.request.urlopen(base_url + "/_late") as reply:  # ours are the last answers
                late = sorted(json.load(reply)[-requests:])
        finally:
            fake.kill()
            server.terminate()
            server.wait(timeout=30)
    print(f"{requests:,} requests, {args.concurrency} in flight per teacher, {args.latency * 1000:.0f} ms latency: "
          f"ideal {ideal:.0f} req/s")
    for name, wall in (("bare aiohttp", bare_s), ("distillery run (whole process)", ours_s)):
        print(f"{name:<32} {wall:7.2f} s  {requests / wall:7.1f} req/s  {requests / wall / ideal:6.1%} of ideal")
    print(f"ours / bare: {bare_s / ours_s:.3f}; peak RSS of distillery run: {usage.ru_maxrss / 1024:.0f} MB")
    span = arrivals[-1] + args.latency - arrivals[0]
    print(f"ours, decomposed: {arrivals[0] - started:.2f} s to the first request, {span:.2f} s from it to the last "
          f"answer ({requests / span / ideal:.1%} of ideal in that span), {ended - arrivals[-1] - args.latency:.2f} s "
          "after the last answer (grading the last shards, publishing, exit)")
    if args.detail:
        seconds = [0] * (int(arrivals[-1] - arrivals[0]) + 1)
        for arrival in arrivals:
            seconds[int(arrival - arrivals[0])] += 1
        print("requests sent in each second from the first:", " ".join(map(str, seconds)))
        ramp = arrivals[0] + RAMP_S
        print(f"ours, requests in flight at the fake server (of {args.concurrency} a teacher), in the first {RAMP_S:.0f} s "
              "(Prefect's flow start, imports) / after: " + ", ".join(
                  f"{role} {_in_flight(times, times[0], ramp, args.latency):.1f} / "
                  f"{_in_flight(times, ramp, times[-1], args.latency):.1f}" for role, times in by_teacher.items()))
        print(f"the fake server's own delay past the latency, ours: mean {1000 * sum(late) / len(late):.1f} ms, "
              f"99th percentile {1000 * late[int(0.99 * len(late))]:.1f} ms; the rest of a request's overhead is in "
              "the client's process, the OS and the fake server's reading of the request")


def _in_flight(arrivals: list[float], start: float, end: float, latency: float) -> float:
    """Mean number of requests the server held over [start, end), sampled every 10 ms: those
    that arrived within the last `latency` seconds (each is held that long, plus its delay)."""
    points = [start + i * 0.01 for i in range(int((end - start) / 0.01))]
    held = [bisect.bisect_right(arrivals, at) - bisect.bisect_right(arrivals, at - latency) for at in points]
    return sum(held) / len(held)


if __name__ == "__main__":
    main()
