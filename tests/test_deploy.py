"""`distillery deploy` against a real Prefect server (the harness's, on loopback), and a
process worker that runs the deployment with the recipe passed as content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply, teacher_role
from flow_helpers import ScriptedTeachers, write_problems
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


def make_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"), overwrite=True)


def write_recipe(path: Path, base_url: str, output_dir: Path, problems: Path) -> dict:
    role = {"base_url": base_url, "model": "teacher", "max_concurrency": 4, "max_retries": 0, "timeout_s": 10,
            "sampling": {"temperature": 0.0, "max_tokens": 64, "seed": 1}}
    recipe = {"run_name": "deployed", "output_dir": str(output_dir),
              "problems": {"source": str(problems), "columns": {"id": "id"}},
              "teachers": {"tool": {**role, "model": "tool"}, "reasoning": {**role, "model": "reasoning"}},
              "stitching": {"order": "tool_first"}, "sandbox": {"kind": "process"}, "shard_retries": 0}
    path.write_text(yaml.safe_dump(recipe))
    return recipe


def test_deploy_registers_the_recipe_content_with_its_schedule(tmp_path):
    from prefect.client.orchestration import get_client

    make_pool("test-pool")
    recipe = write_recipe(tmp_path / "r.yaml", "http://127.0.0.1:9/v1", tmp_path / "out", tmp_path / "p.jsonl")
    result = runner.invoke(app, ["deploy", str(tmp_path / "r.yaml"), "--pool", "test-pool", "--cron", "0 3 * * *"])
    assert result.exit_code == 0, result.output
    registered = json.loads(result.stdout)
    assert registered["deployment"] == "dualdistill/deployed"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dualdistill/deployed")
    assert deployment.parameters == {"recipe": recipe}
    assert deployment.work_pool_name == "test-pool"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--pool", "no-such-pool"], "work pool 'no-such-pool' does not exist"),
    (["--pool", "test-pool", "--cron", "every morning"], "--cron 'every morning' is not a valid cron string"),
])
def test_deploy_refuses_bad_input_naming_it(tmp_path, extra, message):
    make_pool("test-pool")
    write_recipe(tmp_path / "r.yaml", "http://127.0.0.1:9/v1", tmp_path / "out", tmp_path / "p.jsonl")
    result = runner.invoke(app, ["deploy", str(tmp_path / "r.yaml"), *extra])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_deploy_without_a_server_says_how_to_start_one(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    write_recipe(tmp_path / "r.yaml", "http://127.0.0.1:9/v1", tmp_path / "out", tmp_path / "p.jsonl")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = runner.invoke(app, ["deploy", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1
    assert "does not answer" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_process_worker_runs_the_deployment(tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    make_pool("worker-pool")
    rows = write_problems(tmp_path / "p.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", tmp_path / "p.jsonl")
        result = runner.invoke(app, ["deploy", str(tmp_path / "r.yaml"), "--pool", "worker-pool"])
        assert result.exit_code == 0, result.output
        run = run_deployment("dualdistill/deployed", timeout=0)
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "worker-pool",
                                   "--run-once"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = worker.communicate(timeout=240)
        finally:
            worker.kill()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        assert state.is_completed(), output[-3000:]
        assert server.requests
    composites = datasets.load_dataset(str(tmp_path / "out" / "composites"), split="train")
    assert len(composites) == 3  # one problem of each kind; both_wrong is rejected


class BrokenForOneProblem:
    """The scripted teachers, except that while `broken` the reasoning teacher answers 500
    for one problem (its endpoint is down for that request)."""

    def __init__(self, rows: list[dict], broken_id: str) -> None:
        self.teachers = ScriptedTeachers(rows)
        self.broken_text = next(r["problem"] for r in rows if r["id"] == broken_id)
        self.broken = True

    def __call__(self, body: dict) -> Reply:
        if self.broken and not teacher_role(body) == "tool" and self.broken_text in json.dumps(body["messages"]):
            return Reply(status=500)
        return self.teachers(body)


def run_worker_once(pool: str, cwd: Path) -> str:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    return worker.stdout + worker.stderr


@pytest.mark.slow
def test_a_failed_flow_run_retried_through_the_api_resends_nothing_answered(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    make_pool("retry-pool")
    rows = write_problems(tmp_path / "p.jsonl", per_kind=1)
    teachers = BrokenForOneProblem(rows, broken_id=rows[0]["id"])
    with FakeOpenAIServer(teachers) as server:
        write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", tmp_path / "p.jsonl")
        assert runner.invoke(app, ["deploy", str(tmp_path / "r.yaml"), "--pool", "retry-pool"]).exit_code == 0
        run = run_deployment("dualdistill/deployed", timeout=0)
        output = run_worker_once("retry-pool", tmp_path)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.is_failed(), output[-3000:]
        first_attempt = list(server.requests)

        teachers.broken = False  # the endpoint is back: retry the same flow run
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Scheduled(), force=True)
        output = run_worker_once("retry-pool", tmp_path)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.is_completed(), output[-3000:]
        retried = server.requests[len(first_attempt):]

    def key(body: dict) -> str:
        return json.dumps(body, sort_keys=True)

    def failed(body: dict) -> bool:  # what got a 500 in the first attempt
        return teacher_role(body) != "tool" and teachers.broken_text in json.dumps(body["messages"])

    answered = {key(b) for b in first_attempt if not failed(b)}
    assert retried and all(failed(b) for b in retried)  # only the request that never got an answer
    assert not {key(b) for b in retried} & answered
    composites = datasets.load_dataset(str(tmp_path / "out" / "composites"), split="train")
    assert len(composites) == 3


def test_a_cron_schedule_creates_runs_on_the_server(tmp_path):
    """The server's scheduler turns the deployment's cron into scheduled flow runs, each with
    the recipe as its parameter, at the cron's times. The harness's server runs no background
    services, so the scheduler service's loop is run once here, on the server's database."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.server.services.scheduler import schedule_deployments

    make_pool("cron-pool")
    recipe = write_recipe(tmp_path / "r.yaml", "http://127.0.0.1:9/v1", tmp_path / "out", tmp_path / "p.jsonl")
    result = runner.invoke(app, ["deploy", str(tmp_path / "r.yaml"), "--pool", "cron-pool", "--cron", "*/5 * * * *",
                                 "--name", "every-five-minutes"])
    assert result.exit_code == 0, result.output
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dualdistill/every-five-minutes")
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        assert client.read_flow_runs(deployment_filter=only_this) == []
        asyncio.run(schedule_deployments())
        runs = client.read_flow_runs(deployment_filter=only_this)
    assert len(runs) >= 3, "the scheduler created too few runs"
    assert all(run.state.name == "Scheduled" and run.parameters == {"recipe": recipe} for run in runs)
    starts = sorted(run.expected_start_time for run in runs)
    assert all(start.minute % 5 == 0 and start.second == 0 for start in starts)
