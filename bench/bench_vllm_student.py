"""Benchmark the `vllm` student backend against the same engine behind its OpenAI server.

Both sides run the self-distillation student as the flow does (`build_student`: the tool
loop with the sandbox, K seeded samples per problem, each turn journaled) on the same
problems, prompt, sampling and checkpoint (the embedded SmolLM2 GGUF, converted once to
safetensors since vLLM's CPU build cannot read GGUF):
  offline  backend `vllm`: vLLM's async engine (`AsyncLLM`) in this process; every sample's
           next turn enters the running batch as soon as its code has run
  server   backend `endpoint`: `python -m vllm.entrypoints.openai.api_server` on loopback
           (the engine settings the offline side gets by default on a CPU),
           one HTTP request per sample and turn, all samples in flight at once
Side by side in one run: both engines are started first (not timed; an idle engine costs no
CPU), then the sides take turns, offline-server then server-offline (`--rounds` 2 by default,
so a load that drifts during the run weighs on both alike). Every turn starts from an empty
journal and an emptied prefix cache. Same seeds on both sides: the completions must be the
same, and the bench says whether they were. Figures: student completion tokens per second of
wall time (the sandbox runs included), over all of a side's turns; per turn also the requests,
prompt tokens and the CPU time of this process (the offline side's includes the engine's
output processing, which the server does in its own process).

Needs the vllm venv: make test-vllm builds it (.venv-vllm). Run:
  .venv-vllm/bin/python bench/bench_vllm_student.py [--problems 16] [--k 8] [--max-tokens 192]
      [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flows.execution.sandbox import make_sandbox
from flows.inputs.problems import arithmetic_problems
from flows.models.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_path
from flows.models.journal import RequestJournal
from flows.models.vllm_backend import load_engine, servable_checkpoint, shutdown_engines
from flows.teachers.students import build_student
from schemas.recipe import StudentSpec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _sample_all(spec: StudentSpec, problems, k: int, journal_dir: Path) -> dict:
    journal = RequestJournal(journal_dir)
    student = build_student(spec, make_sandbox("process"), journal, [])
    started, cpu_started = time.perf_counter(), time.process_time()
    trajectories = await asyncio.gather(
        *(student.solve(problem, "bench", sample=i) for problem in problems for i in range(k))
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await student.client.aclose()
    journal.close()
    return {
        "requests": sum(t.requests for t in trajectories),
        "tool_calls": sum(t.tool_calls for t in trajectories),
        "prompt_tokens": student.client.stats.prompt_tokens,
        "tokens": sum(t.completion_tokens for t in trajectories),
        "wall_s": wall,
        "cpu_s": cpu,
        "texts": [t.text for t in trajectories],
    }


def _start_server(checkpoint: str, dtype: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
               "--served-model-name", EMBEDDED_MODEL_NAME, "--port", str(port), "--dtype", dtype,
               "--enable-prefix-caching", "--no-enable-chunked-prefill", "--gpu-memory-utilization", "0.25"]
    # dev mode for POST /reset_prefix_cache only
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vllm server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return server, base
        except OSError:
            time.sleep(1)
    server.terminate()
    raise TimeoutError(f"the vllm server did not answer at {base} in 900 s")


def _reset_server_cache(base: str) -> None:
    for _ in range(50):  # refused while blocks are still held; the previous turn just ended
        with urllib.request.urlopen(urllib.request.Request(f"{base}/reset_prefix_cache", method="POST")) as reply:
            if b"true" in reply.read():
                return
        time.sleep(0.1)
    raise RuntimeError("the vllm server did not reset its prefix cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=2, help="turns per side, alternating which side goes first")
    args = parser.parse_args()

    problems = arithmetic_problems(args.problems, seed=3)
    checkpoint = servable_checkpoint(embedded_gguf_path())
    sampling = {"temperature": 0.8, "top_p": 0.95, "max_tokens": args.max_tokens, "seed": 11}
    common = {"sampling": sampling, "max_concurrency": args.problems * args.k, "max_tool_calls": 2, "logprobs": False}
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        engine_args = {"dtype": args.dtype}
        engine = load_engine(str(embedded_gguf_path()), engine_args)  # what the `vllm` student loads
        server, base = _start_server(checkpoint, args.dtype, Path(tmp, "server.log"))
        specs = {
            "offline": StudentSpec(backend="vllm", model=EMBEDDED_MODEL_NAME, engine_args=engine_args, **common),
            "server": StudentSpec(base_url=f"{base}/v1", model=EMBEDDED_MODEL_NAME, **common),
        }
        try:
            for round_ in range(args.rounds):
                for side in ("offline", "server") if round_ % 2 == 0 else ("server", "offline"):
                    if side == "offline":
                        engine.reset_prefix_cache()
                    else:
                        _reset_server_cache(base)
                    result = asyncio.run(_sample_all(specs[side], problems, args.k, Path(tmp, f"{side}-{round_}")))
                    runs.append((side, result))
                    print(f"{side:8} {result['tokens']} tokens in {result['wall_s']:.1f}s", flush=True)
        finally:
            server.terminate()
            server.wait(60)
            shutdown_engines()

    print(f"\nstudent sampling, {args.problems} problems x K={args.k}, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} cores, dtype {args.dtype}, {args.rounds} rounds")
    print(f"{'side':8} {'requests':>9} {'tool runs':>9} {'prompt tok':>10} {'tokens':>8} {'wall s':>8} "
          f"{'tok/s':>8} {'bench cpu s':>11}")
    for side, r in runs:
        print(f"{side:8} {r['requests']:>9} {r['tool_calls']:>9} {r['prompt_tokens']:>10} {r['tokens']:>8} "
              f"{r['wall_s']:>8.1f} {r['tokens'] / r['wall_s']:>8.1f} {r['cpu_s']:>11.1f}")
    rate = {side: sum(r["tokens"] for s, r in runs if s == side) / sum(r["wall_s"] for s, r in runs if s == side)
            for side in ("offline", "server")}
    same = len({tuple(r["texts"]) for _, r in runs}) == 1
    print(f"tokens per second over all turns: offline {rate['offline']:.1f}, server {rate['server']:.1f}")
    print(f"same completions on both sides and every turn: {'yes' if same else 'no'}")
    print(f"offline / server tokens per second: {rate['offline'] / rate['server']:.3f}x")


if __name__ == "__main__":
    main()
