"""Benchmark the `vllm` student backend against the same engine behind its OpenAI server.

Both sides run the self-distillation student as the flow does (`build_student`: the tool
loop with the sandbox, K seeded samples per problem, each turn journaled) on the same
problems, prompt, sampling and checkpoint (the embedded SmolLM2 GGUF, converted once to
safetensors since vLLM's CPU build cannot read GGUF):
  offline  backend `vllm`: one `vllm.LLM` in this process, every in-flight sample's next
           turn batched into one `LLM.generate` call
  server   backend `endpoint`: `python -m vllm.entrypoints.openai.api_server` on loopback
           (the engine settings the offline side gets by default on a CPU),
           one HTTP request per sample and turn, all samples in flight at once
Each side starts from an empty journal; engine and server start-up are not timed. Figures:
student completion tokens per second of wall time (the sandbox runs included), requests,
and for the offline side the engine calls (batches) they took.

Needs the vllm venv: make test-vllm builds it (.venv-vllm). Run:
  .venv-vllm/bin/python bench/bench_vllm_student.py [--problems 16] [--k 8] [--max-tokens 192]
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
from flows.models.vllm_backend import servable_checkpoint, shutdown_engines
from flows.teachers.students import build_student
from schemas.recipe import StudentSpec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _sample_all(spec: StudentSpec, problems, k: int, journal_dir: Path) -> dict[str, float]:
    journal = RequestJournal(journal_dir)
    sandbox = make_sandbox("process")
    student = build_student(spec, sandbox, journal, [])
    if spec.backend_name == "vllm":
        await student.client._connect()  # engine start-up is not timed
    started = time.perf_counter()
    trajectories = await asyncio.gather(
        *(student.solve(problem, "bench", sample=i) for problem in problems for i in range(k))
    )
    wall = time.perf_counter() - started
    engine = getattr(student.client, "engine", None)
    await student.client.aclose()
    journal.close()
    tokens = sum(t.completion_tokens for t in trajectories)
    return {
        "samples": len(trajectories),
        "requests": sum(t.requests for t in trajectories),
        "tool_calls": sum(t.tool_calls for t in trajectories),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "engine_calls": engine.calls if engine is not None else float("nan"),
    }


def _wait_for_server(url: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vllm server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the vllm server did not answer at {url} in {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    problems = arithmetic_problems(args.problems, seed=3)
    checkpoint = servable_checkpoint(embedded_gguf_path())
    in_flight = args.problems * args.k
    sampling = {"temperature": 0.8, "top_p": 0.95, "max_tokens": args.max_tokens, "seed": 11}
    common = {"sampling": sampling, "max_concurrency": in_flight, "max_tool_calls": 2, "logprobs": False}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        offline = StudentSpec(backend="vllm", model=EMBEDDED_MODEL_NAME, engine_args={"dtype": args.dtype}, **common)
        results["offline"] = asyncio.run(_sample_all(offline, problems, args.k, Path(tmp, "offline")))
        shutdown_engines()  # its idle workers would compete with the server for the cores

        port = _free_port()
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
                   "--served-model-name", EMBEDDED_MODEL_NAME, "--port", str(port), "--dtype", args.dtype,
                   "--enable-prefix-caching", "--no-enable-chunked-prefill", "--gpu-memory-utilization", "0.25"]
        log = open(Path(tmp, "server.log"), "w")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            url = f"http://127.0.0.1:{port}/v1"
            _wait_for_server(url, server)
            endpoint = StudentSpec(base_url=url, model=EMBEDDED_MODEL_NAME, **common)
            results["server"] = asyncio.run(_sample_all(endpoint, problems, args.k, Path(tmp, "server")))
        except Exception:
            log.flush()
            print(Path(tmp, "server.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(60)

    print(f"\nstudent sampling, {args.problems} problems x K={args.k}, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} cores, dtype {args.dtype}")
    print(f"{'side':8} {'samples':>8} {'requests':>9} {'tool runs':>9} {'tokens':>8} {'wall s':>8} "
          f"{'tok/s':>8} {'batches':>8}")
    for side, r in results.items():
        print(f"{side:8} {r['samples']:>8} {r['requests']:>9} {r['tool_calls']:>9} {r['tokens']:>8} "
              f"{r['wall_s']:>8.1f} {r['tok_per_s']:>8.1f} {r['engine_calls']:>8}")
    print(f"offline / server tokens per second: {results['offline']['tok_per_s'] / results['server']['tok_per_s']:.2f}x")


if __name__ == "__main__":
    main()
