"""What a DualDistill run holds in memory does not grow with its shards: each shard's problems
are read when it starts, at most a few shards are open at once, and nothing keeps a finished
shard's graded answers alive once its rows are in the spool."""

from __future__ import annotations

import asyncio
import gc

import pytest
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from flows.dualdistill import dualdistill
from flows.inputs.problem_shards import ProblemShards
from flows.publishing.spool import RowSpool
from flows.stages.shards import shards_at_once
from schemas.records import GradedTrajectory

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_shards_are_read_as_they_start_and_leave_nothing_behind(tmp_path, monkeypatch):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=6)  # 24 problems, a shard each
    seen = {"read": 0, "open": 0, "most_open": 0, "alive": []}
    read, spooled = ProblemShards.read, RowSpool.add

    def graded_alive() -> int:
        gc.collect()  # what is left is held by something
        return sum(isinstance(o, GradedTrajectory) for o in gc.get_objects())

    # those of earlier tests in this process still alive (a background thread's last reference):
    # not this run's to answer for
    earlier = graded_alive()

    def counted_read(shards, index):
        seen["read"] += 1
        seen["open"] += 1
        seen["most_open"] = max(seen["most_open"], seen["open"])
        return read(shards, index)

    def counted_spool(spool, index, rows):  # a finished shard's rows leave for the spool
        seen["open"] -= 1
        seen["alive"].append(graded_alive() - earlier)
        return spooled(spool, index, rows)

    monkeypatch.setattr(ProblemShards, "read", counted_read)
    monkeypatch.setattr(RowSpool, "add", counted_spool)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        teacher = {"base_url": server.base_url, "model": "fake-model", "max_concurrency": 1, "max_retries": 1,
                   "timeout_s": 10}
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              shard_size=1, teachers={"tool": teacher, "reasoning": {**teacher, "model": "r"}})
        summary = asyncio.run(dualdistill(str(recipe)))
    assert summary["problems"] == 24 and seen["read"] == 24
    # 2 problems in flight per teacher: shards_at_once(2, 1) = 5 shards answering, and one grading
    assert 2 <= seen["most_open"] <= shards_at_once(2, 1) + 1, seen
    alive = seen["alive"]
    # graded answers alive when a shard finishes: those of the shards under way (2 a shard, at most
    # 6 open), not those of every finished shard, which would climb to 48 by the last one
    assert max(alive) <= 2 * (shards_at_once(2, 1) + 1) + 8 < 48, alive
