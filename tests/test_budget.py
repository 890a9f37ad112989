"""`budget:` caps: a run stops cleanly when one is reached, and a rerun with a larger cap
continues from the journal without sending any request twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import pytest
import yaml
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from typer.testing import CliRunner

from flows.cli import BUDGET_EXIT_CODE, app
from flows.dualdistill import dualdistill
from flows.models import journal as journal_module
from flows.models import journal_files, journal_usage
from flows.models.budget import Budget, BudgetReached, effective_price, run_budget, spent_in_journal
from flows.models.journal import RequestJournal, index_directory
from schemas.recipe import BudgetSpec, Price, TeacherSpec


def sent(server) -> list[str]:
    return [json.dumps([r["model"], r["messages"], r.get("seed")], sort_keys=True) for r in server.requests]


def set_budget(recipe, **caps) -> None:
    data = yaml.safe_load(recipe.read_text())
    data["budget"] = caps
    recipe.write_text(yaml.safe_dump(data))


@pytest.mark.usefixtures("prefect_harness")
def test_a_request_cap_stops_the_run_and_a_larger_one_continues(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)  # 8 problems: 16 tool + 8 reasoning requests
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        set_budget(recipe, requests=10)
        with pytest.raises(BudgetReached, match=r"budget.requests: 10 of 10 requests spent"):
            asyncio.run(dualdistill(str(recipe)))
        assert len(server.requests) == 10  # the request cap is exact
        assert not (tmp_path / "out" / "composites").exists()  # nothing half-published

        result = CliRunner().invoke(app, ["run", str(recipe)])  # the same cap: stops at once, sends nothing
        assert result.exit_code == BUDGET_EXIT_CODE and "budget.requests" in result.output
        assert len(server.requests) == 10

        set_budget(recipe, requests=100)
        summary = asyncio.run(dualdistill(str(recipe)))
    assert summary["cases"] == {"both_correct": 2, "first_correct": 2, "second_corrects": 2, "both_wrong": 2}
    assert len(server.requests) == 24 and len(set(sent(server))) == 24  # no request sent twice


@pytest.mark.usefixtures("prefect_harness")
def test_a_cost_cap_counts_what_the_journal_already_holds(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        data = yaml.safe_load(recipe.read_text())
        for teacher in data["teachers"].values():
            teacher["price"] = {"prompt_per_mtok": 100.0, "completion_per_mtok": 100.0}
            teacher["max_concurrency"] = 1  # one request at a time, one more queued: the cap is passed by little
        recipe.write_text(yaml.safe_dump(data))
        set_budget(recipe, cost=0.2)  # ~a quarter of the run
        with pytest.raises(BudgetReached, match=r"budget.cost: 0.2\d+ of 0.2000"):
            asyncio.run(dualdistill(str(recipe)))
        first = len(server.requests)
        assert 0 < first < 24
        price = Price(prompt_per_mtok=100.0, completion_per_mtok=100.0)
        tokens, cost, answers = spent_in_journal(tmp_path / "out" / ".distillery" / "journal",
                                                 {"tool": price, "reasoning": price})
        assert answers == first and 0.2 <= cost == pytest.approx(tokens * 100 / 1e6)
        # passed by at most what was admitted when the cap was reached: two requests per teacher
        answers_tokens = [json.loads(line)["value"] for path in (tmp_path / "out" / ".distillery" / "journal").glob("*")
                          for line in path.read_text().splitlines()]
        largest = max((v.get("prompt_tokens", 0) + v.get("completion_tokens", 0)) * 100 / 1e6 for v in answers_tokens)
        assert cost - 0.2 < 2 * 2 * largest

        set_budget(recipe, cost=100.0)
        asyncio.run(dualdistill(str(recipe)))
    assert len(server.requests) == 24 and len(set(sent(server))) == 24


def test_budget_unit_rules(tmp_path):
    budget = Budget(BudgetSpec(tokens=100, requests=5))
    for _ in range(3):
        budget.admit()
    budget.spend(60, 50, Price(prompt_per_mtok=2.0, completion_per_mtok=4.0))
    assert budget.reached() == "budget.tokens: 110 of 100 tokens" and budget.cost == pytest.approx(320 / 1e6)
    with pytest.raises(BudgetReached, match="Raise the cap"):
        budget.admit()
    assert budget.requests == 3 and budget.stopped == "budget.tokens: 110 of 100 tokens spent"

    assert run_budget(BudgetSpec(), tmp_path, []) is None  # no caps: no budget, no journal scan
    journal = tmp_path / "journal"
    journal.mkdir()
    answer = {"content": "x", "finish_reason": "stop", "prompt_tokens": 1000, "completion_tokens": 500}
    lines = [{"key": "a", "value": answer}, {"key": "b", "value": {"stdout": "4"}}, {"key": "c", "value": answer}]
    (journal / "tool-shard-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "tor')
    (journal / "reasoning-shard-00000.jsonl").write_text(json.dumps({"key": "d", "value": answer}) + "\n")
    batch = TeacherSpec(base_url="http://x/v1", model="m", mode="batch",
                        price=Price(prompt_per_mtok=2.0, completion_per_mtok=8.0))
    online = TeacherSpec(base_url="http://x/v1", model="m", price=Price(prompt_per_mtok=2.0, completion_per_mtok=8.0))
    assert effective_price(batch).completion_per_mtok == 4.0 and effective_price(online).completion_per_mtok == 8.0
    budget = run_budget(BudgetSpec(cost=1.0), journal, [("tool", batch), ("reasoning", TeacherSpec(endpoint="embedded"))])
    assert (budget.tokens, budget.requests) == (4500, 3)
    assert budget.cost == pytest.approx(2 * (1000 * 1.0 + 500 * 4.0) / 1e6)  # the embedded model costs nothing


def test_a_budget_watching_the_journal_counts_what_other_shards_spend(tmp_path):
    """Two shards on two workers share the journal folder and the caps: each counts the
    other's journaled answers once it refreshes, and never counts its own twice."""
    journal_dir = tmp_path / "journal"
    answer = {"content": "x", "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5}
    spec = TeacherSpec(base_url="http://x/v1", model="m", price=Price(prompt_per_mtok=1.0, completion_per_mtok=2.0))
    mine = run_budget(BudgetSpec(requests=10, tokens=1000), journal_dir, [("tool", spec)])
    theirs = run_budget(BudgetSpec(requests=10, tokens=1000), journal_dir, [("tool", spec)])
    journal = RequestJournal(journal_dir)
    for i in range(3):  # my three requests: admitted, answered, journaled, spent
        mine.admit()
        journal.record("tool-shard-00000", f"mine-{i}", answer)
        mine.spend(10, 5, spec.price)
    mine.admit()  # a fourth, still in flight
    for i in range(5):  # the other shard's five
        theirs.admit()
        journal.record("tool-shard-00001", f"theirs-{i}", answer)
        theirs.spend(10, 5, spec.price)
    assert (mine.requests, mine.tokens) == (4, 45)  # not watching: only its own

    mine.refresh()
    assert (mine.requests, mine.tokens) == (3 + 5 + 1, 8 * 15)  # every journaled answer once, + its one in flight
    assert mine.cost == pytest.approx(8 * (10 + 10) / 1e6)
    mine.admit()
    with pytest.raises(BudgetReached, match=r"budget\.requests: 10 of 10"):
        mine.admit()
    mine.refresh()  # the journal knows less than it does now (two in flight): its own figures stay
    assert mine.requests == 10

    watching = run_budget(BudgetSpec(requests=100), journal_dir, [("tool", spec)])
    watching.watch_others(every_s=0.0)
    journal.record("tool-shard-00002", "late", answer)
    journal.close()
    watching.admit()  # starts a refresh in a thread
    for _ in range(200):
        if watching.tokens == 9 * 15:
            break
        time.sleep(0.01)
    assert (watching.requests, watching.tokens) == (1 + 8 + 1, 9 * 15)  # its own in flight, the 8 journaled, the late one


class CountedReads:
    """`open` and `os.pread` for flows/models/journal*.py that count the bytes read from journal files."""

    def __init__(self, monkeypatch) -> None:
        self.bytes = 0
        real_pread = os.pread
        for module in (journal_module, journal_files, journal_usage):
            monkeypatch.setattr(module, "open", self.open, raising=False)
        monkeypatch.setattr(journal_module.os, "pread", lambda fd, size, at: self.count(real_pread(fd, size, at)))

    def count(self, data: bytes) -> bytes:
        self.bytes += len(data)
        return data

    def open(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller's `with` closes it
        return _Counted(handle, self) if str(path).endswith(".jsonl") else handle


class _Counted:
    def __init__(self, handle, reads: CountedReads) -> None:
        self._handle, self._reads = handle, reads

    def read(self, *size):
        return self._reads.count(self._handle.read(*size))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self._handle.close()


def test_the_journal_s_spending_comes_from_its_index(tmp_path, monkeypatch):
    journal_dir = tmp_path / "journal"
    answer = {"content": "x" * 200, "finish_reason": "stop", "prompt_tokens": 30, "completion_tokens": 70}
    journal = RequestJournal(journal_dir)
    for i in range(3000):
        journal.record(f"tool-shard-{i % 2:05d}", f"k{i}", answer if i % 10 else {"output": "4", "failed": False})
    journal.close()
    with (journal_dir / "reasoning-shard-00000.jsonl").open("a") as late:  # after the index was written
        late.write(json.dumps({"key": "late", "time": 1.0, "value": answer}) + "\n")
    size = sum(path.stat().st_size for path in journal_dir.glob("*.jsonl"))
    assert size > 600_000
    price = Price(prompt_per_mtok=1.0, completion_per_mtok=2.0)
    expected = (2701 * 100, 2701 * (30 + 140) / 1e6, 2701)

    reads = CountedReads(monkeypatch)
    tokens, cost, answers = spent_in_journal(journal_dir, {"tool": price, "reasoning": price})
    assert (tokens, answers) == expected[::2] and cost == pytest.approx(expected[1])
    assert reads.bytes < 2 * 2 * 4096 + 1000  # the probes of two indexed files, and the unindexed one

    shutil.rmtree(index_directory(journal_dir))  # no index: every line read, the same figures
    reads.bytes = 0
    tokens, cost, answers = spent_in_journal(journal_dir, {"tool": price, "reasoning": price})
    assert (tokens, answers) == expected[::2] and cost == pytest.approx(expected[1])
    assert reads.bytes == size
