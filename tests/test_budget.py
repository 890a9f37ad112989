"""`budget:` caps: a run stops cleanly when one is reached, and a rerun with a larger cap
continues from the journal without sending any request twice."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from typer.testing import CliRunner

from flows.cli import BUDGET_EXIT_CODE, app
from flows.dualdistill import dualdistill
from flows.models.budget import Budget, BudgetReached, effective_price, run_budget, spent_in_journal
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
