"""What the Prefect UI shows of a failed DualDistill run and of its retry (a new attempt of the
same flow run, as the UI's Retry button makes it): task runs named by role and shard, one
progress artifact per stage that the retry updates, a failure message on one line, one
traceback per failure, and a line at the start of each attempt saying what it replays."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_openai import FakeOpenAIServer, Reply, teacher_role
from flow_helpers import ScriptedTeachers, write_problems, write_recipe

from flows.dualdistill import dualdistill
from flows.orchestration.runs import RunFailed

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _logs_artifacts_tasks(flow_run_id):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return run, logs, artifacts, tasks


def test_a_failed_run_and_its_retry_read_like_the_run_in_the_ui(tmp_path):
    import logging

    flow_logger = logging.getLogger("prefect.flow_runs")
    level = flow_logger.level
    flow_logger.setLevel(logging.INFO)  # the tests keep Prefect at WARNING; the attempt line is INFO
    try:
        _fail_then_retry(tmp_path)
    finally:
        flow_logger.setLevel(level)


def _fail_then_retry(tmp_path):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_async
    from prefect.states import AwaitingRetry

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)
    script = ScriptedTeachers(rows)
    failing = {"on": True}

    def reasoning_fails_on_one_shard(body):
        if failing["on"] and teacher_role(body) == "reasoning" and "[both_wrong]" in json.dumps(body):
            return Reply(status=400)
        return script(body)

    with FakeOpenAIServer(reasoning_fails_on_one_shard) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              shard_retries=0)
        with pytest.raises(RunFailed):
            asyncio.run(dualdistill(recipe_path=str(recipe)))
        with get_client(sync_client=True) as client:
            (flow_run,) = [r for r in client.read_flow_runs() if r.parameters.get("recipe_path") == str(recipe)]
        run, logs, artifacts, tasks = _logs_artifacts_tasks(flow_run.id)
        assert run.state.is_failed() and "\n" not in run.state.message
        assert run.state.message.startswith("RunFailed: 1 shard(s) failed") and "shard-00003" in run.state.message
        assert sum("Traceback" in message for message in logs) == 1  # the failed shard's task, not the flow again
        assert not any("\\n" in message for message in logs if message.startswith("Finished in state"))
        assert sorted(task.name for task in tasks) == [f"answer[tool+reasoning] shard-0000{i}" for i in range(4)]
        assert "attempt 1: nothing journaled yet; 24 first requests to send (12 problems × 2 teachers)" in logs
        stale = {a.key: a.description for a in artifacts if a.type == "progress"}
        assert "run failed" in stale["dualdistill-flow-test-grade"] and "ETA" not in str(stale)

        failing["on"] = False  # the UI's Retry: the same flow run, a new attempt
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, AwaitingRetry(), force=True)
            flow_run = client.read_flow_run(flow_run.id)
        asyncio.run(run_flow_async(dualdistill, flow_run=flow_run, parameters=flow_run.parameters))
        assert len(server.requests) > 0

    run, logs, artifacts, tasks = _logs_artifacts_tasks(flow_run.id)
    assert run.state.is_completed() and run.run_count == 2
    assert ("attempt 2: of 24 first requests (12 problems × 2 teachers), tool 12 to replay and 0 to send, "
            "reasoning 9 to replay and 3 to send (a tool teacher's later turns are replayed or sent as they come)") in logs
    progress = [a for a in artifacts if a.type == "progress"]
    assert sorted(a.key for a in progress) == ["dualdistill-flow-test-answer-reasoning",
                                               "dualdistill-flow-test-answer-tool", "dualdistill-flow-test-grade"]
    assert all(a.data == 100.0 and a.description.endswith("done") for a in progress)
    retried = [task for task in tasks if task.name == "answer[tool+reasoning] shard-00003"]
    assert sorted(task.state.type.value for task in retried) == ["COMPLETED", "FAILED"]
