"""What a DualDistill run holds in memory does not grow with its shards: each shard's problems
are read when it starts, at most a few shards are open at once, and Prefect keeps no link to
a finished shard's task results."""

from __future__ import annotations

import asyncio

import pytest
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from prefect.context import FlowRunContext

import flows.dualdistill as dualdistill_module
from flows.dualdistill import dualdistill
from flows.inputs.problem_shards import ProblemShards

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_shards_are_read_as_they_start_and_leave_nothing_behind(tmp_path, monkeypatch):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=6)  # 24 problems, a shard each
    seen = {"read": 0, "open": 0, "most_open": 0, "links": []}
    read, in_memory = ProblemShards.read, dualdistill_module._shard_in_memory

    def counted_read(shards, index):
        seen["read"] += 1
        seen["open"] += 1
        seen["most_open"] = max(seen["most_open"], seen["open"])
        return read(shards, index)

    async def watched(*args):
        try:
            return await in_memory(*args)
        finally:
            seen["open"] -= 1
            seen["links"].append(len(FlowRunContext.get().run_results))

    monkeypatch.setattr(ProblemShards, "read", counted_read)
    monkeypatch.setattr(dualdistill_module, "_shard_in_memory", watched)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        teacher = {"base_url": server.base_url, "model": "fake-model", "max_concurrency": 1, "max_retries": 1,
                   "timeout_s": 10}
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              shard_size=1, teachers={"tool": teacher, "reasoning": {**teacher, "model": "r"}})
        summary = asyncio.run(dualdistill(str(recipe)))
    assert summary["problems"] == 24 and seen["read"] == 24
    # 2 problems in flight per teacher: 5 shards answering at once each, 10 open in all
    assert 5 <= seen["most_open"] <= 10
    links = seen["links"]
    assert links[-1] - links[4] <= 4, links  # not ~6 more a shard (its answers, grades and rows)
