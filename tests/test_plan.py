"""`distillery plan`: figures from the recipe alone, and from a seeded pilot against a fake
server whose token counts are known; the run then reuses the pilot's answers."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from typer.testing import CliRunner

from flows.cli import app

PRICE = {"prompt_per_mtok": 2.0, "completion_per_mtok": 8.0}


def plan_of(recipe) -> dict:
    result = CliRunner().invoke(app, ["plan", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def configure(recipe, pilot: int, reasoning_mode: str = "online") -> None:
    data = yaml.safe_load(recipe.read_text())
    data["plan"] = {"pilot": pilot}
    data["teachers"]["tool"]["price"] = PRICE
    data["teachers"]["reasoning"] |= {"price": PRICE, "mode": reasoning_mode, "throughput_tokens_per_s": 50.0}
    recipe.write_text(yaml.safe_dump(data))


def test_without_a_pilot_nothing_is_sent_and_the_figures_are_bounds(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)  # 12 problems
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        configure(recipe, pilot=0, reasoning_mode="batch")
        plan = plan_of(recipe)
    assert server.requests == []
    roles = {r["role"]: r for r in plan["roles"]}
    assert plan["units"] == 12 and roles["tool"]["answers"] == 12
    max_tokens = 256
    tool_turns = yaml.safe_load(recipe.read_text())["teachers"]["tool"].get("max_tool_calls", 10) + 1
    assert roles["tool"]["requests"] == 12 * tool_turns and roles["reasoning"]["requests"] == 12
    assert roles["reasoning"]["completion_tokens"] == 12 * max_tokens
    assert roles["reasoning"]["seconds"] == pytest.approx(12 * max_tokens / 50.0)  # the stated throughput
    assert roles["tool"]["seconds"] is None and plan["wall_s"] is None
    assert roles["reasoning"]["cost_online"] == pytest.approx(12 * max_tokens * 8.0 / 1e6)
    assert roles["reasoning"]["cost_batch"] == pytest.approx(roles["reasoning"]["cost_online"] / 2)
    assert roles["reasoning"]["mode"] == "batch" and roles["tool"]["mode"] == "online"


@pytest.mark.usefixtures("prefect_harness")
def test_a_pilot_measures_per_answer_figures_and_the_run_reuses_its_answers(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)
    with FakeOpenAIServer(ScriptedTeachers(rows), latency_s=0.05) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        configure(recipe, pilot=4)
        plan = plan_of(recipe)
        pilot_requests = list(server.requests)
        # the pilot's first four problems: the tool teacher writes code then answers, the reasoner answers once
        assert len(pilot_requests) == 4 * 2 + 4

        journal = tmp_path / "out" / ".distillery" / "journal"
        tokens = {role: [0, 0] for role in ("tool", "reasoning")}
        for path in journal.glob("*.jsonl"):
            role = path.stem.split("-")[0]
            for line in path.read_text().splitlines():
                value = json.loads(line)["value"]
                if "finish_reason" in value:
                    tokens[role][0] += value["prompt_tokens"]
                    tokens[role][1] += value["completion_tokens"]
        roles = {r["role"]: r for r in plan["roles"]}
        for role, (prompt, completion) in tokens.items():
            assert roles[role]["prompt_tokens"] == pytest.approx(12 * prompt / 4)
            assert roles[role]["completion_tokens"] == pytest.approx(12 * completion / 4)
            cost = (12 * prompt / 4 * 2.0 + 12 * completion / 4 * 8.0) / 1e6
            assert roles[role]["cost_online"] == pytest.approx(cost)
        assert roles["tool"]["requests"] == pytest.approx(24) and roles["reasoning"]["requests"] == pytest.approx(12)
        latency = roles["tool"]["seconds"] * roles["tool"]["concurrency"] / roles["tool"]["requests"]
        assert 0.05 <= latency < 1.0  # the measured latency per request, scaled
        assert plan["wall_s"] == max(r["seconds"] for r in plan["roles"])

        from flows.dualdistill import dualdistill

        asyncio.run(dualdistill(str(recipe)))
    assert len(server.requests) == 36  # the pilot's 12 requests are not sent again


def test_plan_names_a_bad_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("run_name: x\noutput_dir: out\nplan: {pilot: -1}\n")
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "plan.pilot" in result.output
