"""`distillery run`'s head start: the first shards' requests go out before Prefect has loaded,
and the flow takes those answers over without sending anything twice."""

from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest
import yaml
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from typer.testing import CliRunner

from flows.cli import app
from flows.dualdistill import dualdistill
from flows.orchestration import head_start, request_loop
from flows.orchestration.head_start import HeadStart
from schemas.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("prefect_harness")


def sent(server) -> list[str]:
    return [json.dumps([r["model"], r["messages"], r.get("seed")], sort_keys=True) for r in server.requests]


def rows_of(folder) -> list[str]:
    table = pq.read_table(sorted(folder.glob("**/*.parquet"))).to_pylist()
    timings = {"latency_s", "latency_s_1", "latency_s_2"}  # measured, so never equal twice
    return sorted(json.dumps({k: v for k, v in row.items() if k not in timings}, sort_keys=True, default=str)
                  for row in table)


class Watched:
    """Records what the flow took from each head start, and what it left."""

    def __init__(self, monkeypatch) -> None:
        self.begun: list[HeadStart] = []
        self.taken: list[tuple[str, str]] = []
        begin, take = head_start.begin, HeadStart.take

        def watched_begin(recipe):
            head = begin(recipe)
            if head is not None:
                self.begun.append(head)
            return head

        def watched_take(head, role, shard, problems):
            started = take(head, role, shard, problems)
            if started is not None:
                self.taken.append((role, shard))
            return started

        monkeypatch.setattr(head_start, "begin", watched_begin)
        monkeypatch.setattr(HeadStart, "take", watched_take)


def test_the_flow_takes_over_the_head_start_and_sends_each_request_once(tmp_path, monkeypatch):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)  # 12 problems: 4 shards of 3
    watched = Watched(monkeypatch)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        data = yaml.safe_load(recipe.read_text())
        for teacher in data["teachers"].values():
            teacher["max_concurrency"] = 1  # 2 problems in flight: 3 of the 4 shards of each role get a head start
        recipe.write_text(yaml.safe_dump(data))

        result = CliRunner().invoke(app, ["run", str(recipe)])
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 12 * 3 and len(set(sent(server))) == 36  # tool: 2 turns, reasoning: 1
        [head] = watched.begun
        for role in ("tool", "reasoning"):  # the flow's window at least, more while Prefect was loading
            assert [shard for r, shard in head.started if r == role][:3] == ["shard-00000", "shard-00001", "shard-00002"]
        assert sorted(watched.taken) == sorted(head.started) and not head.shards  # every one taken over

        # the same recipe's flow called directly (no head start), on a fresh folder: the same rows
        direct = write_recipe(tmp_path / "direct.yaml", tmp_path / "problems.jsonl", server.base_url,
                              tmp_path / "direct", teachers=data["teachers"])
        asyncio.run(dualdistill(str(direct)))
    for dataset in ("composites", "trajectories", "rejected"):
        assert rows_of(tmp_path / "out" / dataset) == rows_of(tmp_path / "direct" / dataset)
    summary = json.loads((tmp_path / "out" / ".distillery" / "summary.json").read_text())
    assert summary["sent_this_run"] == {"tool": 24, "reasoning": 12}
    assert summary["cases"] == json.loads((tmp_path / "direct" / ".distillery" / "summary.json").read_text())["cases"]
    progress = json.loads((tmp_path / "out" / ".distillery" / "progress.json").read_text())
    assert {s["name"]: s["done"] for s in progress["stages"]} == {"answer[tool]": 12, "answer[reasoning]": 12,
                                                                  "grade": 24}


def test_a_rerun_whose_answers_prefect_cached_leaves_the_head_start_and_sends_nothing(tmp_path, monkeypatch):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        assert CliRunner().invoke(app, ["run", str(recipe)]).exit_code == 0
        first = len(server.requests)
        watched = Watched(monkeypatch)
        result = CliRunner().invoke(app, ["run", str(recipe)])
        assert result.exit_code == 0, result.output
    assert len(server.requests) == first  # the head start replayed the journal; nothing went out again
    [head] = watched.begun
    assert head.started and watched.taken == [] and not head.shards  # cached answer tasks: all cancelled


def test_a_failing_head_start_fails_the_run_naming_stage_and_endpoint(tmp_path):
    dead = "{base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: 0}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_name: x\noutput_dir: {tmp_path / 'out'}\nproblems: {{source: builtin:arithmetic, limit: 2}}\n"
                      f"teachers: {{tool: {dead}, reasoning: {dead}}}\nshard_retries: 0\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1
    error = result.output[result.output.index("error:"):]
    assert "stage answer[tool]" in error and "http://127.0.0.1:9/v1" in error and "connection failed" in error
    assert head_start._pending is None


def test_no_head_start_where_the_flow_does_not_answer_here(tmp_path):
    write_problems(tmp_path / "problems.jsonl", per_kind=1)
    base = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", "http://127.0.0.1:9/v1", tmp_path / "out")
    on_dask = write_recipe(tmp_path / "d.yaml", tmp_path / "problems.jsonl", "http://127.0.0.1:9/v1",
                           tmp_path / "out", execution={"task_runner": "dask"})
    missing = write_recipe(tmp_path / "m.yaml", tmp_path / "nowhere.jsonl", "http://127.0.0.1:9/v1", tmp_path / "out")

    async def begun(path) -> bool:
        head = head_start.begin(load_recipe(path, job="dualdistill"))
        await head_start.drop()
        return head is not None

    assert asyncio.run(begun(base))
    assert not asyncio.run(begun(on_dask))
    assert not asyncio.run(begun(missing))  # the flow itself then names the missing file


def test_a_shard_is_taken_once_and_another_recipe_claims_nothing(tmp_path):
    write_problems(tmp_path / "problems.jsonl", per_kind=1)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", "http://127.0.0.1:9/v1",
                                      tmp_path / "out"), job="dualdistill")
    other = recipe.model_copy(update={"shard_size": 2})

    async def ended(*tasks: asyncio.Task) -> None:  # run on the request loop, where the tasks are
        await asyncio.gather(*tasks, return_exceptions=True)

    async def scenario() -> None:
        head = head_start.begin(recipe)
        await request_loop.run(asyncio.sleep(0))  # queued after the feeders: their first shards have started
        tool, reasoning = head.shards[("tool", "shard-00000")], head.shards[("reasoning", "shard-00000")]
        assert head.take("tool", "shard-00000", tool.problems[:1]) is None  # other problems: not these answers
        await request_loop.run(ended(tool.task))
        assert tool.task.cancelled()
        assert head.take("reasoning", "shard-00000", reasoning.problems) is reasoning
        assert head.take("reasoning", "shard-00000", reasoning.problems) is None  # once: a retry starts afresh
        left = list(head.shards.values())
        assert await head_start.claim(other) is None  # another recipe: closed, runtime and shards
        assert left and all(s.task.done() for s in left) and not head.shards
        assert head_start._pending is None
        await request_loop.run(ended(reasoning.task))

    asyncio.run(scenario())
