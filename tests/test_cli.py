from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_grade_adds_verdicts_and_keeps_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"id": 1, "answer": "1", "response": "<answer>\\boxed{10}</answer>"}) + "\n"
        + json.dumps({"id": 2, "answer": "\\frac{1}{3}", "response": "so \\boxed{12/36}"}) + "\n"
    )
    result = runner.invoke(app, ["grade", str(path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(l["id"], l["correct"], l["extracted"]) for l in lines] == [(1, False, "10"), (2, True, "12/36")]
    assert all(l["reason"] for l in lines)


def test_grade_names_the_line_of_bad_input(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"answer": "1", "response": "x"}) + "\n" + json.dumps({"answer": "2"}) + "\n")
    result = runner.invoke(app, ["grade", str(path)])
    assert result.exit_code == 1
    assert "line 2" in result.output and "response" in result.output


def write_recipe(tmp_path, limit: int, reasoning: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_name: x\noutput_dir: out\nproblems: {{source: builtin:arithmetic, limit: {limit}}}\n"
                      f"teachers: {{tool: {{endpoint: embedded}}, reasoning: {reasoning}}}\n")
    return recipe


def test_check_and_run_refuse_a_bad_recipe_naming_the_field(tmp_path):
    recipe = write_recipe(tmp_path, 2, "{base_url: localhost, model: m}")
    for command in ("check", "run"):
        result = runner.invoke(app, [command, str(recipe)])
        assert result.exit_code == 1
        assert "teachers.reasoning" in result.output and "http://" in result.output


def test_check_counts_problems(tmp_path):
    recipe = write_recipe(tmp_path, 7, "{endpoint: embedded}")
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 0 and json.loads(result.stdout)["problems"] == 7


def test_run_against_a_dead_endpoint_exits_1_naming_stage_and_endpoint(tmp_path, prefect_harness):
    dead = "{base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: 0}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_name: x\noutput_dir: {tmp_path / 'out'}\nproblems: {{source: builtin:arithmetic, limit: 2}}\n"
                      f"teachers: {{tool: {dead}, reasoning: {dead}}}\nshard_retries: 0\n")
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1
    error = result.output[result.output.index("error:"):]
    assert "stage answer[tool]" in error and "stage answer[reasoning]" in error
    assert "http://127.0.0.1:9/v1" in error and "connection failed" in error


