"""Start-up of `distillery run`: from the command to its first model request.

    .venv/bin/python bench/bench_startup.py [--trials 3]

Against a running `prefect server start` (loopback, its own PREFECT_HOME) and a loopback
fake teacher, each trial runs `distillery run` in a fresh process on a fresh output folder
and prints the seconds from spawning it to the first request the fake teacher sees, beside
`python -c pass` and `python -c "import flows.dualdistill"` (what importing costs), and twice
with no server configured (Prefect then starts a temporary one): on a fresh PREFECT_HOME,
whose database is created first, then on the same home again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_deployment import FirstRequest, start_server  # noqa: E402
from fake_openai import FakeOpenAIServer  # noqa: E402
from flow_helpers import write_problems, write_recipe  # noqa: E402


def seconds(command: list[str], env: dict[str, str]) -> float:
    started = time.time()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=ROOT)
    return time.time() - started


def first_request_after(env: dict[str, str], recipe: Path, teachers: FirstRequest) -> float:
    teachers.first = None
    started = time.time()
    subprocess.run([str(ROOT / ".venv" / "bin" / "distillery"), "run", str(recipe)], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return teachers.first - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server, api = start_server(tmp_path / "prefect-home")
        env = {**base_env, "PREFECT_API_URL": api}
        try:
            python = [sys.executable, "-c"]
            bare = statistics.median(seconds([*python, "pass"], env) for _ in range(args.trials))
            imports = statistics.median(seconds([*python, "import flows.dualdistill"], env)
                                        for _ in range(args.trials))
            rows = write_problems(tmp_path / "p.jsonl", per_kind=2)
            teachers = FirstRequest(rows)
            with FakeOpenAIServer(teachers) as fake:
                with_server = []
                for trial in range(args.trials):
                    recipe = write_recipe(tmp_path / f"r{trial}.yaml", tmp_path / "p.jsonl", fake.base_url,
                                          tmp_path / f"out-{trial}")
                    with_server.append(first_request_after(env, recipe, teachers))
                temporary = []  # a fresh PREFECT_HOME (its database created and migrated), then the same again
                for trial in range(2):
                    recipe = write_recipe(tmp_path / f"temporary-{trial}.yaml", tmp_path / "p.jsonl", fake.base_url,
                                          tmp_path / f"out-temporary-{trial}")
                    temporary.append(first_request_after({**base_env, "PREFECT_HOME": str(tmp_path / "home-2")},
                                                         recipe, teachers))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"python -c pass: {bare:.2f} s; import flows.dualdistill: {imports:.2f} s (medians of {args.trials})")
    print("distillery run -> first model request, running server: "
          + ", ".join(f"{s:.2f}" for s in with_server) + f" s (median {statistics.median(with_server):.2f} s)")
    print(f"distillery run -> first model request, no server configured (temporary one): {temporary[0]:.2f} s "
          f"on a fresh PREFECT_HOME (its database created), {temporary[1]:.2f} s on the same home again")


if __name__ == "__main__":
    main()
