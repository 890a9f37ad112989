"""Throughput of the DualDistill flow against a loopback fake server with fixed latency.

    .venv/bin/python bench/bench_dualdistill.py [--problems 2000] [--latency 0.2] [--concurrency 32]
                                                [--code-share 0.0] [--code-blocks 1]

Both teachers point at one fake OpenAI server that answers every request after
`--latency` seconds. The tool teacher answers directly (no code) unless
`--code-share` > 0, in which case that share of its answers run `--code-blocks`
code blocks in the sandbox first (one more request per block); with several blocks
each uses what the one before defined (in the trajectory's live session); the sandbox's
own time per block is printed. Prints, per teacher endpoint:

  rate ratio  = achieved request rate / (concurrency / latency), over the span
                from that endpoint's first request to its last answer (target ≥ 0.90)
and for the run:
  outside share = (flow wall time − span of model calls) / flow wall time
                (Prefect, grading, stitching, publishing; target ≤ 0.05)

The fake server runs in its own process (as a real endpoint would), and the
Prefect server is started before timing (as a deployed run would find it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_openai import Reply, completion_body, executor_turns, problem_text, teacher_role  # noqa: E402
from flow_helpers import write_recipe  # noqa: E402


class TimedTeachers:
    """Right answers for `a + b` problems; records each request's start/end per teacher."""

    def __init__(self, rows: list[dict], code_share: float, code_blocks: int = 1) -> None:
        self.rows = {r["problem"]: r for r in rows}
        self.code_every = round(1 / code_share) if code_share > 0 else 0
        self.code_blocks = code_blocks
        self.spans: dict[str, list[float]] = {"tool": [], "reasoning": []}  # request arrival times
        self.problems = set(self.rows)

    def __call__(self, body: dict) -> Reply:
        role = teacher_role(body)
        self.spans[role].append(time.time())
        text = problem_text(body, self.problems)
        row = self.rows[text]
        if role == "reasoning":
            return Reply(content=f"<answer>\\boxed{{{row['answer']}}}</answer>", reasoning_content="adding up")
        uses_code = self.code_every and row["index"] % self.code_every == 0
        block = executor_turns(body, text)
        if uses_code and block < self.code_blocks:
            return Reply(content=f"<code>\n{code_block(row['expr'], block, self.code_blocks)}\n")
        return Reply(content=f"So the sum is {row['answer']}.\n<answer>\\boxed{{{row['answer']}}}</answer>")


def code_block(expr: str, index: int, blocks: int) -> str:
    """Block `index` of a chain: the first computes, the middle ones build on it, the last prints."""
    if blocks == 1:
        return f"print({expr})"
    if index == 0:
        return f"import math\nvalue = {expr}\nprint('computed')"
    if index < blocks - 1:
        return f"value = value + math.floor(0.5)\nprint('checked {index}')"
    return "print(value)"


def write_problems(path: Path, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = 1000 + i, 37 * i + 11
        rows.append({"id": f"b{i}", "problem": f"Problem {i}: what is {a} + {b}?", "answer": str(a + b),
                     "expr": f"{a} + {b}", "index": i})
    path.write_text("".join(json.dumps({k: r[k] for k in ("id", "problem", "answer")}) + "\n" for r in rows))
    return rows


def serve(problems: Path, count: int, latency: float, code_share: float, code_blocks: int) -> None:
    """The fake endpoint, in this separate process: prints its URL, serves until killed.

    asyncio (aiohttp.web) rather than the tests' thread-per-connection server, which
    tops out near 130 requests/s on this machine: the bench must measure the flow.
    """
    from aiohttp import web

    rows = write_problems(problems, count)
    script = TimedTeachers(rows, code_share, code_blocks)
    late: list[float] = []  # how long past `latency` each answer was sent: this server's own delay

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        arrived = time.monotonic()
        reply = script(body)
        await asyncio.sleep(latency)
        late.append(time.monotonic() - arrived - latency)
        return web.json_response(completion_body(body, reply))

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**script.spans, "cpu_s": time.process_time()})

    async def lateness(request: web.Request) -> web.Response:
        return web.json_response(late)

    async def run() -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/_stats", stats)
        app.router.add_get("/v1/_late", lateness)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}/v1", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def _empty_task(index: int) -> int:
    return index


async def _prefect_baseline(tasks: int) -> None:
    """A flow that does nothing but run as many Prefect tasks as the real run did."""
    from prefect import task

    empty = task(name="empty")(_empty_task)
    await asyncio.gather(*(empty(i) for i in range(tasks)))


def prefect_fixed_cost(tasks: int) -> float:
    from prefect import flow

    baseline = flow(name="prefect-baseline")(_prefect_baseline)
    started = time.time()
    asyncio.run(baseline(tasks))
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--code-share", type=float, default=0.0)
    parser.add_argument("--code-blocks", type=int, default=1)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.problems, args.latency, args.code_share, args.code_blocks)
        return
    block_times = _time_sandbox_blocks()

    from prefect.testing.utilities import prefect_test_harness

    from flows.dualdistill import dualdistill

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp_path = Path(tmp)
        problems = tmp_path / "problems.jsonl"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(problems), "--problems", str(args.problems),
             "--latency", str(args.latency), "--code-share", str(args.code_share),
             "--code-blocks", str(args.code_blocks)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            base_url = server.stdout.readline().strip()
            teacher = {"max_concurrency": args.concurrency, "max_retries": 2, "timeout_s": 30}
            recipe = write_recipe(tmp_path / "r.yaml", problems, base_url, tmp_path / "out",
                                  shard_size=args.shard_size, stitching={"order": "both"})
            _set_teacher_options(recipe, teacher)
            started, cpu_started = time.time(), time.process_time()
            summary = asyncio.run(dualdistill(str(recipe)))
            ended, flow_cpu = time.time(), time.process_time() - cpu_started
            with urllib.request.urlopen(base_url + "/_stats") as reply:
                spans = json.load(reply)
            server_cpu = spans.pop("cpu_s")
            shards = -(-args.problems // args.shard_size)
            prefect_cost = prefect_fixed_cost(4 * shards + 1)  # 2 answer + grade + stitch per shard, publish
        finally:
            server.kill()

    wall = ended - started
    first_request = min(min(s) for s in spans.values() if s)
    last_answer = min(max(max(s) for s in spans.values() if s) + args.latency, ended)
    model_span = last_answer - first_request
    print(f"problems: {args.problems}  latency: {args.latency*1000:.0f} ms  concurrency per teacher: "
          f"{args.concurrency}  code share: {args.code_share:.0%} x {args.code_blocks} block(s)  "
          f"shard size: {args.shard_size}")
    print(f"{'endpoint':<10} {'requests':>9} {'span s':>8} {'rate/s':>8} {'limit/s':>8} {'ratio':>6}")
    for role, starts in spans.items():
        span = max(starts) + args.latency - min(starts)
        rate = len(starts) / span
        limit = args.concurrency / args.latency
        print(f"{role:<10} {len(starts):>9} {span:>8.2f} {rate:>8.1f} {limit:>8.1f} {rate / limit:>6.3f}")
    outside = wall - model_span
    print(f"flow wall {wall:.2f} s, model-call span {model_span:.2f} s, outside {outside:.2f} s "
          f"= {outside / wall:.3f} of wall (before the first request {first_request - started:.2f} s, "
          f"after the last answer {ended - last_answer:.2f} s)")
    ours = outside - prefect_cost
    print(f"Prefect's own cost for an empty flow with the same {4 * shards + 1} tasks: {prefect_cost:.2f} s; "
          f"outside time less that: {ours:.2f} s = {ours / wall:.3f} of wall")
    print(f"CPU seconds: flow process {flow_cpu:.2f} ({flow_cpu / wall:.0%} of a core), "
          f"fake server {server_cpu:.2f}; per request in the flow process "
          f"{1000 * flow_cpu / sum(len(s) for s in spans.values()):.2f} ms")
    print(f"cases: {summary['cases']}")
    if block_times:
        per_block = sorted(block_times)
        print(f"sandbox time per block (live sessions, {len(per_block)} blocks): "
              f"mean {1000 * sum(per_block) / len(per_block):.1f} ms, median {1000 * per_block[len(per_block) // 2]:.1f} ms")


def _time_sandbox_blocks() -> list[float]:
    """Record each block's own duration in its session, not its wait for a slot."""
    from flows.execution.session import Session

    times: list[float] = []
    run = Session.run

    async def timed(self, code, history=()):
        result = await run(self, code, history)
        times.append(result.duration_s)
        return result

    Session.run = timed
    return times


def _set_teacher_options(recipe: Path, options: dict) -> None:
    import yaml

    data = yaml.safe_load(recipe.read_text())
    for role in ("tool", "reasoning"):
        data["teachers"][role].update(options)
    recipe.write_text(yaml.safe_dump(data))


if __name__ == "__main__":
    main()
