"""Operating numbers on a real Prefect server: how soon a deployed run reaches its first model
request, and how much server CPU a 2,000-problem flow run costs.

    .venv/bin/python bench/bench_deployment.py [--trials 3] [--poll 10] [--problems 2000]

1. Starts `prefect server start` on loopback (its own PREFECT_HOME and SQLite database, all
   services on, as a team would run it), a process work pool and a `prefect worker start`
   that polls every `--poll` seconds (Prefect's default is 10).
2. `distillery deploy`s a small DualDistill recipe against a loopback fake teacher, then per
   trial runs `prefect deployment run` (with a fresh output_dir, so nothing is replayed) and
   prints the time from that command's start to the first request the fake teacher sees,
   split into: the CLI call, the wait for the worker's poll, the flow process's start-up.
3. Runs the 2,000-problem benchmark flow (bench_dualdistill.py's fake endpoint: 200 ms
   latency, 32 requests in flight per teacher) in this process against that server, and
   prints the server's CPU seconds for the run (its process tree, less its idle rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from fake_openai import FakeOpenAIServer  # noqa: E402
from flow_helpers import ScriptedTeachers, write_problems, write_recipe  # noqa: E402

PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(api + "/health", timeout=2):
                return server, api
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the Prefect server did not start within 120 s")


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class FirstRequest:
    """The scripted teachers, noting when the first request of each trial arrives."""

    def __init__(self, rows: list[dict]) -> None:
        self.teachers = ScriptedTeachers(rows)
        self.first: float | None = None

    def __call__(self, body: dict):
        if self.first is None:
            self.first = time.time()
        return self.teachers(body)


def run_state_times(api: str, run_id: str) -> dict[str, float]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run_id)
    return {s.name: s.timestamp.timestamp() for s in states}


def wait_for_terminal(run_id: str, timeout: float = 300) -> str:
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            state = client.read_flow_run(run_id).state
            if state.is_final():
                return state.name
            time.sleep(0.5)
    return "timeout"


def time_to_first_request(api: str, tmp: Path, trials: int, poll: int) -> None:
    env = {**os.environ, "PREFECT_API_URL": api}
    rows = write_problems(tmp / "p.jsonl", per_kind=2)
    teachers = FirstRequest(rows)
    subprocess.run([*PREFECT, "work-pool", "create", "--type", "process", "bench"], env=env, check=True,
                   capture_output=True)
    with FakeOpenAIServer(teachers) as fake:
        recipe = write_recipe(tmp / "r.yaml", tmp / "p.jsonl", fake.base_url, tmp / "out-0", run_name="bench-deploy")
        subprocess.run([sys.executable, "-m", "flows.cli", "deploy", str(recipe), "--pool", "bench"], env=env,
                       check=True, capture_output=True, cwd=ROOT)
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "bench"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env={**env, "PREFECT_WORKER_QUERY_SECONDS": str(poll)})
        time.sleep(poll + 5)  # the worker is up and has polled once
        import yaml

        content = yaml.safe_load(recipe.read_text())
        print(f"\nfrom `prefect deployment run` to the first model request (process worker polling every {poll} s)")
        print(f"{'trial':>5} {'total s':>8} {'CLI call':>9} {'to Pending':>11} {'to Running':>11} {'to request':>11}")
        try:
            for trial in range(1, trials + 1):
                teachers.first = None
                params = {"recipe": {**content, "output_dir": str(tmp / f"out-{trial}")}}
                started = time.time()
                ran = subprocess.run([*PREFECT, "deployment", "run", "dualdistill/bench-deploy", "--params",
                                      json.dumps(params)], env=env, capture_output=True, text=True, check=True)
                returned = time.time()
                run_id = next(line.split()[-1] for line in ran.stdout.splitlines() if "UUID" in line)
                while teachers.first is None and time.time() - started < 300:
                    time.sleep(0.01)
                final = wait_for_terminal(run_id)
                states = run_state_times(api, run_id)
                first = teachers.first or float("nan")
                print(f"{trial:>5} {first - started:>8.2f} {returned - started:>9.2f} "
                      f"{states.get('Pending', float('nan')) - returned:>11.2f} "
                      f"{states.get('Running', float('nan')) - states.get('Pending', float('nan')):>11.2f} "
                      f"{first - states.get('Running', float('nan')):>11.2f}   ({final})")
                time.sleep(1 + (trial * 3.7) % poll)  # trials land at different points of the poll cycle
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def server_cpu_per_run(server: subprocess.Popen, api: str, tmp: Path, problems: int) -> None:
    from bench_dualdistill import _set_teacher_options

    from flows.dualdistill import dualdistill

    bench = Path(__file__).with_name("bench_dualdistill.py")
    fake = subprocess.Popen([sys.executable, str(bench), "--serve", str(tmp / "big.jsonl"), "--problems",
                             str(problems), "--latency", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        base_url = fake.stdout.readline().strip()
        recipe = write_recipe(tmp / "big.yaml", tmp / "big.jsonl", base_url, tmp / "big-out", run_name="bench-cpu",
                              stitching={"order": "both"}, shard_size=250)
        _set_teacher_options(recipe, {"max_concurrency": 32, "max_retries": 2, "timeout_s": 30})
        process = psutil.Process(server.pid)
        idle_from, idle_cpu = time.time(), cpu_seconds(process)
        time.sleep(10)
        idle_rate = (cpu_seconds(process) - idle_cpu) / (time.time() - idle_from)
        started, cpu_before = time.time(), cpu_seconds(process)
        summary = asyncio.run(dualdistill(str(recipe)))
        ran = time.time() - started
        time.sleep(5)  # the server's services record the run's last events
        spent = cpu_seconds(process) - cpu_before
        window = time.time() - started
    finally:
        fake.kill()
    shards = -(-problems // 250)
    print(f"\n{problems}-problem flow run ({4 * shards + 1} task runs, {ran:.1f} s, "
          f"{sum(t['requests'] for t in summary['teachers'].values())} requests)")
    print(f"Prefect server CPU: {spent:.2f} s over {window:.1f} s; idle rate {idle_rate:.3f} CPU s/s; "
          f"attributable to the run: {spent - idle_rate * window:.2f} CPU s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--poll", type=int, default=10, help="the worker's PREFECT_WORKER_QUERY_SECONDS")
    parser.add_argument("--problems", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server, api = start_server(tmp_path / "prefect-home")
        os.environ["PREFECT_API_URL"] = api  # this process's Prefect client too (imported after this)
        try:
            time_to_first_request(api, tmp_path, args.trials, args.poll)
            server_cpu_per_run(server, api, tmp_path, args.problems)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
