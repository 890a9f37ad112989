"""Scale-out: the same DualDistill run on 1 and 2 Dask workers (and threads, for reference).

    .venv/bin/python bench/bench_scale_out.py [--problems 2500] [--latency 0.2] [--concurrency 16]
                                              [--shard-size 250] [--workers 1 2] [--no-threads]

Both teachers answer every problem in one request (no code), so a run is 2 × problems
requests (5,000 by default) against one fake OpenAI server in its own process that answers
each after `--latency` seconds (bench/bench_dualdistill.py's `serve`, a fresh one per run).
`max_concurrency` is `--concurrency` per teacher, and a Dask worker runs one shard at a time
with clients of its own, so N workers may have N × concurrency requests of a teacher in
flight. Per run it prints:

  model rate  = requests / (last answer − first request): the throughput the workers reach
  wall        = the flow run, cluster start and shutdown included

and the ratio of the 2-worker model rate to the 1-worker one (the aim: ≥ 1.8). Prefect's
server is started before timing (as a deployed run would find it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from flow_helpers import write_recipe  # noqa: E402


def run_once(tmp: Path, args: argparse.Namespace, execution: dict) -> dict:
    from flows.dualdistill import dualdistill

    problems = tmp / "problems.jsonl"
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bench_dualdistill.py"), "--serve", str(problems),
         "--problems", str(args.problems), "--latency", str(args.latency)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        name = execution["task_runner"] + str(execution.get("workers", ""))
        recipe = write_recipe(tmp / f"{name}.yaml", problems, base_url, tmp / name, shard_size=args.shard_size,
                              execution=execution)
        _set_teacher_options(recipe, {"max_concurrency": args.concurrency, "max_retries": 2, "timeout_s": 30})
        started = time.time()
        summary = asyncio.run(dualdistill(str(recipe)))
        wall = time.time() - started
        with urllib.request.urlopen(base_url + "/_stats") as reply:
            spans = json.load(reply)
    finally:
        server.kill()
        server.wait()
    arrivals = spans["tool"] + spans["reasoning"]
    model_span = max(arrivals) + args.latency - min(arrivals)
    return {"name": name, "requests": len(arrivals), "model_span": model_span, "rate": len(arrivals) / model_span,
            "wall": wall, "before_first": min(arrivals) - started, "sent": sum(summary["sent_this_run"].values()),
            "cases": summary["cases"]}


def _set_teacher_options(recipe: Path, options: dict) -> None:
    import yaml

    data = yaml.safe_load(recipe.read_text())
    for role in ("tool", "reasoning"):
        data["teachers"][role].update(options)
    recipe.write_text(yaml.safe_dump(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=2500)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-threads", action="store_true", help="skip the threads reference run")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    runs = [] if args.no_threads else [{"task_runner": "threads"}]
    runs += [{"task_runner": "dask", "workers": n} for n in args.workers]
    results = []
    with prefect_test_harness(server_startup_timeout=120):
        for execution in runs:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(run_once(Path(tmp), args, execution))
                print(f"{results[-1]['name']}: done in {results[-1]['wall']:.1f} s", file=sys.stderr, flush=True)

    print(f"problems: {args.problems} (both teachers, one request each)  latency: {args.latency * 1000:.0f} ms  "
          f"max_concurrency per teacher: {args.concurrency}  shard size: {args.shard_size}")
    print(f"{'runner':<9} {'requests':>9} {'model s':>8} {'rate/s':>8} {'limit/s':>8} {'wall s':>7} {'to 1st req':>10}")
    for r in results:
        workers = int(r["name"][4:] or 1) if r["name"].startswith("dask") else 1
        limit = 2 * args.concurrency * workers / args.latency
        print(f"{r['name']:<9} {r['requests']:>9} {r['model_span']:>8.2f} {r['rate']:>8.1f} {limit:>8.1f} "
              f"{r['wall']:>7.2f} {r['before_first']:>10.2f}")
    by_name = {r["name"]: r for r in results}
    if "dask1" in by_name and "dask2" in by_name:
        one, two = by_name["dask1"], by_name["dask2"]
        print(f"2 workers / 1 worker: model rate ×{two['rate'] / one['rate']:.2f} (aim ≥ 1.8), "
              f"wall ×{one['wall'] / two['wall']:.2f}")
    assert all(r["sent"] == r["requests"] for r in results), "a run sent a request twice or not at all"


if __name__ == "__main__":
    main()
