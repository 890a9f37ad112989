"""Progress per stage: progress.json, Prefect progress artifacts, and `distillery status`."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
import yaml
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from typer.testing import CliRunner

from flows.cli import app
from flows.dualdistill import dualdistill
from flows.orchestration.progress import RunProgress, describe, is_stale, journal_by_role, read_progress
from flows.models.client import ClientStats

pytestmark = pytest.mark.usefixtures("prefect_harness")


def status_json(folder) -> dict:
    result = CliRunner().invoke(app, ["status", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def stages(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["progress"]["stages"]}


def test_status_of_a_running_then_finished_run_and_artifacts(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=4)  # 16 problems, 6 shards
    with FakeOpenAIServer(ScriptedTeachers(rows), latency_s=0.4) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              run_name="progress-test")  # its own artifact keys on the shared server
        slow = yaml.safe_load(recipe.read_text())
        for teacher in slow["teachers"].values():
            teacher["max_concurrency"] = 2  # 16 problems take a few seconds: the run is seen half-way
        recipe.write_text(yaml.safe_dump(slow))
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(asyncio.run(dualdistill(str(recipe)))))
        runner.start()
        deadline, mid = time.time() + 60, None
        while time.time() < deadline and runner.is_alive():
            progress = read_progress(tmp_path / "out" / ".distillery")
            answered = progress and {s["name"]: s for s in progress["stages"]}.get("answer[reasoning]")
            if answered and 0 < answered["done"] < answered["total"]:
                mid = status_json(tmp_path / "out")
                break
            time.sleep(0.1)
        runner.join()

    assert mid is not None, "never saw the run half-way"
    assert mid["progress"]["state"] == "running" and not mid["progress"]["stale"]
    running = stages(mid)
    assert set(running) == {"answer[tool]", "answer[reasoning]", "grade"}
    assert 0 < running["answer[reasoning]"]["done"] < 16 and running["answer[reasoning]"]["total"] == 16
    assert running["answer[reasoning]"]["requests"] >= running["answer[reasoning]"]["done"]

    final = status_json(tmp_path / "out")
    assert final["progress"]["state"] == "completed"
    done = stages(final)
    assert {name: (s["done"], s["total"]) for name, s in done.items()} == {
        "answer[tool]": (16, 16), "answer[reasoning]": (16, 16), "grade": (32, 32)}
    assert done["answer[tool]"]["requests"] == 32 and done["answer[reasoning]"]["requests"] == 16
    assert done["answer[tool]"]["eta_s"] == 0.0
    # the journal's own counts: one answer per request, per role
    assert final["journal"]["tool"]["answers"] == 32 and final["journal"]["reasoning"]["answers"] == 16
    assert final["journal"]["reasoning"]["completion_tokens"] == outcome["teachers"]["reasoning"]["completion_tokens"]

    text = CliRunner().invoke(app, ["status", str(tmp_path / "out")])
    assert text.exit_code == 0 and "completed" in text.stdout and "answer[tool]" in text.stdout
    assert "16/16 answers" in text.stdout

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))

    latest = {}
    for artifact in sorted(asyncio.run(artifacts()), key=lambda a: a.created):
        if artifact.key and artifact.key.startswith("dualdistill-progress-test-"):
            latest[artifact.key] = artifact
    assert set(latest) == {"dualdistill-progress-test-answer-tool", "dualdistill-progress-test-answer-reasoning",
                           "dualdistill-progress-test-grade"}
    tool = latest["dualdistill-progress-test-answer-tool"]
    assert float(tool.data) == 100.0 and "16/16 answers" in tool.description and "32 requests" in tool.description


def test_status_names_a_missing_run(tmp_path):
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 1 and "no run here" in result.output
    result = CliRunner().invoke(app, ["status", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such folder" in result.output


def test_a_run_whose_process_is_gone_is_stale(tmp_path):
    progress = RunProgress(tmp_path, "r", "dualdistill")
    stats = ClientStats(sent=3, prompt_tokens=30, completion_tokens=12)
    progress.stage("answer[tool]", 10, "answers", stats)
    tick = progress.ticker("answer[tool]", "shard-00000")
    for _ in range(4):
        tick()
    progress.write(force=True)
    snapshot = read_progress(tmp_path)
    assert snapshot["stages"][0]["done"] == 4 and not is_stale(snapshot)
    assert "4/10 answers" in describe(snapshot["stages"][0]) and "ETA" in describe(snapshot["stages"][0])

    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    snapshot["pid"] = child  # a process that has exited
    assert is_stale(snapshot)
    assert is_stale({**snapshot, "host": "elsewhere", "updated": time.time() - 600})
    assert not is_stale({**snapshot, "host": "elsewhere", "updated": time.time()})
    assert not is_stale({**snapshot, "state": "completed"})


def test_a_retried_shard_does_not_count_twice(tmp_path):
    progress = RunProgress(tmp_path, "r", "leakage")
    progress.stage("numbers[trait]", 6, "completions")
    first = progress.ticker("numbers[trait]", "trait-00000")
    first(), first()
    again = progress.ticker("numbers[trait]", "trait-00000")  # the retry starts the shard over
    again()
    assert progress.stages["numbers[trait]"].done == 1
    progress.shard_done("numbers[trait]", "trait-00000", 3)
    progress.shard_done("numbers[trait]", "trait-00001", 3)  # a cached shard: no ticks
    assert progress.stages["numbers[trait]"].done == 6
    assert progress.stages["numbers[trait]"].worked == 3  # the ticks (the retry's one and the first two)

    progress.stage("grade", 4, "answers")  # a stage with no ticker: its shards count in its rate when done now
    progress.shard_done("grade", "shard-00000", 2, worked=True)
    progress.shard_done("grade", "shard-00001", 2)  # cached
    assert progress.stages["grade"].worked == 2 and progress.stages["grade"].done == 4


def test_journal_figures_by_role(tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    answer = {"content": "x", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2}
    lines = {"tool-shard-00000": [answer, {"stdout": "1"}, answer], "tool-shard-00001": [answer],
             "student-r1-shard-00000": [answer], "trait-00003": [answer, answer]}
    for name, values in lines.items():
        (journal / f"{name}.jsonl").write_text(
            "".join(json.dumps({"key": f"k{i}", "time": 100.0 + i, "value": v}) + "\n" for i, v in enumerate(values))
            + '{"key": "cut sh')
    roles = journal_by_role(journal)
    assert {role: (r["files"], r["entries"], r["answers"], r["completion_tokens"]) for role, r in roles.items()} == {
        "tool": (2, 4, 3, 6), "student": (1, 1, 1, 2), "trait": (1, 2, 2, 4)}


def test_a_run_without_logs_hides_third_party_bars_and_warnings(monkeypatch):
    import logging
    import os
    import warnings

    import datasets

    from flows.orchestration.terminal import quiet_third_party

    variables = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")
    for name in variables:
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    datasets.enable_progress_bars()
    try:
        with warnings.catch_warnings():
            quiet_third_party()
            assert not datasets.is_progress_bar_enabled()
            assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR
            assert [os.environ[name] for name in variables] == ["1", "error", "1"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.warn("soon gone", FutureWarning)
            assert caught == []
    finally:
        datasets.enable_progress_bars()


def test_quieting_does_not_import_datasets_yet_its_bars_stay_hidden():
    """`datasets` costs ~1 s to import: quieting it must not import it before the first request."""
    import subprocess
    import sys

    script = ("import sys; from flows.orchestration.terminal import quiet_third_party; quiet_third_party(); "
              "assert 'datasets' not in sys.modules; import datasets; assert not datasets.is_progress_bar_enabled()")
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


def test_a_cli_run_hides_the_bars_of_libraries_its_flow_imports():
    """The self-distillation flow imports datasets and huggingface_hub, and training imports
    transformers: without --logs none of their bars print ("Loading weights", "Writing model shards")."""
    import subprocess
    import sys

    script = ("from flows.cli import _load_flow; _load_flow('self_distill', False); import transformers; "
              "from huggingface_hub.utils import are_progress_bars_disabled; assert are_progress_bars_disabled(); "
              "assert not transformers.utils.logging.is_progress_bar_enabled()")
    quiet = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)

