"""One run per output folder: the lock, its stale takeover, and two `distillery run` at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe

from flows.orchestration import run_lock
from flows.orchestration.run_lock import LOCK_FILE, RunLocked

HOLD = """
import sys, time
from pathlib import Path
from flows.orchestration import run_lock
run_lock.take(Path(sys.argv[1]), "dualdistill")
print("held", flush=True)
time.sleep(120)
"""


def holder_process(state_dir):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_taker_fails_naming_the_holder(tmp_path):
    state = tmp_path / "out" / ".distillery"
    child = holder_process(state)
    try:
        with pytest.raises(RunLocked) as refused:
            run_lock.take(state, "dualdistill")
    finally:
        child.kill()
        child.wait()
    message = str(refused.value)
    assert f"pid {child.pid} on {socket.gethostname()}" in message and "job dualdistill" in message
    assert "started 20" in message and "another output_dir" in message and str(tmp_path / "out") in message


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    state = tmp_path / ".distillery"
    child = holder_process(state)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert json.loads((state / LOCK_FILE).read_text())["pid"] == child.pid  # the body stays behind
    with caplog.at_level(logging.WARNING, logger="distillery.run_lock"):
        with run_lock.holding(state, "leakage"):
            body = json.loads((state / LOCK_FILE).read_text())
            assert body["pid"] == os.getpid() and body["job"] == "leakage"
    assert f"left by pid {child.pid}" in caplog.text and "that process is gone" in caplog.text
    assert (state / LOCK_FILE).read_text() == ""  # a normal end leaves no holder named


def test_another_hosts_lock_is_kept_while_its_heartbeat_is_fresh(tmp_path, caplog):
    state = tmp_path / ".distillery"
    state.mkdir()
    body = {"pid": 4242, "host": "elsewhere", "job": "dualdistill", "started_at": "2026-01-01T00:00:00+00:00",
            "heartbeat": time.time() - 10}
    (state / LOCK_FILE).write_text(json.dumps(body))
    with pytest.raises(RunLocked, match="pid 4242 on elsewhere.*heartbeat is 1\\d s old"):
        run_lock.take(state, "dualdistill")
    (state / LOCK_FILE).write_text(json.dumps({**body, "heartbeat": time.time() - run_lock.STALE_AFTER_S - 1}))
    with caplog.at_level(logging.WARNING, logger="distillery.run_lock"), run_lock.holding(state, "dualdistill"):
        pass
    assert "left by pid 4242 on elsewhere" in caplog.text and "last heartbeat" in caplog.text


def test_the_cli_hands_its_lock_to_its_flow_once(tmp_path):
    state = tmp_path / ".distillery"
    with run_lock.holding(state, "dualdistill", hand_over=True):
        with run_lock.holding(state, "dualdistill"):  # the flow, in the same process
            with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
                run_lock.take(state, "dualdistill")  # a second flow in this process
        with pytest.raises(RunLocked):  # the hand-over was used once
            run_lock.take(state, "dualdistill")
        assert json.loads((state / LOCK_FILE).read_text())["pid"] == os.getpid()  # still held
    with run_lock.holding(state, "dualdistill"):  # released: free again
        pass


def test_the_heartbeat_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    state = tmp_path / ".distillery"
    with run_lock.holding(state, "dualdistill"):
        first = json.loads((state / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        later = json.loads((state / LOCK_FILE).read_text())["heartbeat"]
    assert later > first


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_two_distillery_runs_at_once_one_fails_before_any_request(tmp_path):
    """Two real `distillery run` processes on one output folder, started together: one is
    refused with the holder named and sends nothing; the other publishes each row once."""
    import datasets
    from prefect.settings import PREFECT_API_URL

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=5)
    with FakeOpenAIServer(ScriptedTeachers(rows), latency_s=0.1) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}
        command = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--logs"]
        runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        outputs = [run.communicate(timeout=240) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], outputs
    winner, loser = (runs.index(r) for r in sorted(runs, key=lambda r: r.returncode))
    refusal = " ".join(outputs[loser][1].split())
    assert "is in use by another run: pid " in refusal and f"pid {runs[winner].pid} on" in refusal, refusal
    assert "job dualdistill" in refusal and "another output_dir" in refusal
    assert len(server.requests) == 20 * 3  # one run's requests (tool: 2 a problem, reasoning: 1), none twice
    composites = datasets.load_dataset(str(tmp_path / "out" / "composites"), split="train")
    assert len(composites) == 15 and len(set(composites["id"])) == 15
    trajectories = datasets.load_dataset(str(tmp_path / "out" / "trajectories"), split="train")
    assert len(trajectories) == 40


@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_on_a_held_folder_fails_before_any_request(tmp_path):
    import asyncio

    from flows.dualdistill import dualdistill

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        child = holder_process(tmp_path / "out" / ".distillery")
        try:
            with pytest.raises(RunLocked, match=f"pid {child.pid}"):
                asyncio.run(dualdistill(str(recipe)))
        finally:
            child.kill()
            child.wait()
    assert server.requests == []


def test_a_worker_shard_writes_under_the_flows_lock_and_takes_none(tmp_path):
    """What a Dask or Ray worker runs (`dualdistill_shard` with no runtime) works while the flow, here another
    process, holds the folder's lock: a worker never tries to take it."""
    import asyncio

    from flows.inputs.problem_shards import load_problems
    from flows.dualdistill import dualdistill_shard as run_shard
    from schemas.recipe import load_recipe

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url,
                                          tmp_path / "out"))
        flow = holder_process(recipe.state_dir)
        try:
            outcome = asyncio.run(run_shard(recipe, 0, load_problems(recipe.problems)))
            assert json.loads((recipe.state_dir / LOCK_FILE).read_text())["pid"] == flow.pid
        finally:
            flow.kill()
            flow.wait()
    assert len(outcome.graded) == 8


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("job", ["self_distill", "leakage"])
def test_the_other_flows_take_the_lock_first(tmp_path, job):
    import asyncio

    import yaml

    from flows.leakage import leakage
    from flows.self_distill import self_distill

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    recipe = yaml.safe_load((recipes / f"{job}_demo.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "out")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    flow = holder_process(tmp_path / "out" / ".distillery")
    try:
        with pytest.raises(RunLocked, match=f"pid {flow.pid} on .*, job dualdistill"):
            asyncio.run({"self_distill": self_distill, "leakage": leakage}[job](str(tmp_path / "r.yaml")))
    finally:
        flow.kill()
        flow.wait()


def test_a_url_outputs_lock_stays_in_its_mirror(tmp_path):
    """The lock file is the mirror's own: never uploaded to the URL, nor pulled from it."""
    from flows.publishing.storage import _files

    state = tmp_path / ".distillery"
    with run_lock.holding(state, "dualdistill"):
        (state / "journal").mkdir()
        (state / "journal" / "tool-shard-00000.jsonl").write_text("{}\n")
        assert [p.name for p in _files(state)] == ["tool-shard-00000.jsonl"]
