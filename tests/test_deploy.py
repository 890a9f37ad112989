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
from fake_openai import FakeOpenAIServer
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
