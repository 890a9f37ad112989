"""Well-formed but unusable answers (empty, blank, a bare refusal) are data: kept, graded
`empty_answer`, counted, journaled; they never fail a shard."""

from __future__ import annotations

import asyncio
import json
import shutil

import datasets
import pytest
from fake_openai import FakeOpenAIServer, Reply, problem_text, teacher_role
from flow_helpers import ScriptedTeachers, write_problems, write_recipe

from flows.grading import grade
from flows.grading.refusal import empty_reason


@pytest.mark.parametrize("response", ["", "   \n\t", "I'm sorry, I can't help with that.",
                                      "I cannot assist with this request.", "Sorry — as an AI I won't do this."])
def test_nothing_to_grade_is_an_empty_answer(response):
    verdict = grade(response, "42")
    assert not verdict.correct and verdict.reason.startswith("empty_answer") and verdict.extracted is None


@pytest.mark.parametrize("response", ["Sorry, I misread. <answer>\\boxed{42}</answer>", "I can compute it: \\boxed{42}",
                                      "Sorry, let me redo it. " + "Step. " * 100 + "So it is 42."])
def test_an_answer_after_an_apology_is_graded_as_usual(response):
    assert empty_reason(response) is None


def test_the_empty_answer_reasons_name_what_was_missing():
    assert empty_reason(" ") == "empty_answer: the response is empty"
    assert empty_reason("I’m sorry, but I can’t help with that.") == "empty_answer: a refusal with no answer"


@pytest.mark.usefixtures("prefect_harness")
def test_an_empty_teacher_answer_completes_the_run_and_is_never_sent_again(tmp_path):
    from flows.dualdistill import dualdistill

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    script = ScriptedTeachers(rows)
    empty_for = {("tool", rows[0]["problem"]): "", ("reasoning", rows[2]["problem"]): "  \n",
                 ("reasoning", rows[3]["problem"]): "I'm sorry, I can't help with that."}

    def some_empty(body):
        key = (teacher_role(body), problem_text(body, list(script.by_text)))
        return Reply(content=empty_for[key]) if key in empty_for else script(body)

    out = tmp_path / "out"
    with FakeOpenAIServer(some_empty) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, out)
        summary = asyncio.run(dualdistill(str(recipe)))
    assert len(server.requests) == 8 * 2 + 8 - 1  # the empty tool turn ends its trajectory: no second turn
    # both_correct-0: the tool answer is empty, the reasoning one right; tool_only-*: reasoning was wrong anyway
    assert summary["cases"] == {"both_correct": 1, "first_correct": 2, "second_corrects": 3, "both_wrong": 2}
    assert summary["teachers"]["tool"]["empty_answers"] == 1
    assert summary["teachers"]["reasoning"]["empty_answers"] == 2
    assert summary["teachers"]["reasoning"]["wrong_by_reason"]["empty_answer"] == 2
    saved = json.loads((out / ".distillery" / "summary.json").read_text())
    assert saved["teachers"]["tool"]["empty_answers"] == 1

    trajectories = datasets.load_dataset(str(out / "trajectories"), split="train")
    empty = [t for t in trajectories if t["grade_reason"].startswith("empty_answer")]
    assert sorted((t["problem_id"], t["teacher"], t["text"]) for t in empty) == [
        ("both_correct-0", "tool", ""), ("tool_only-0", "reasoning", ""),
        ("tool_only-1", "reasoning", "I'm sorry, I can't help with that.")]
    assert not any(t["correct"] for t in empty)
    card = (out / "trajectories" / "README.md").read_text()
    assert "empty answers" in card and "`empty_answer`" in card

    # The rerun, with the cached stages gone, replays every answer from the journal: nothing is sent.
    shutil.rmtree(out / ".distillery" / "prefect-results")
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, out)
        again = asyncio.run(dualdistill(str(recipe)))
    assert dead.requests == [] and again["cases"] == summary["cases"]
    assert again["teachers"]["reasoning"]["empty_answers"] == 2


@pytest.mark.usefixtures("prefect_harness")
def test_an_empty_student_sample_is_graded_and_journaled_like_any_other(tmp_path):
    from test_self_distill import ScriptedStudent, SEED
    from test_self_distill import write_problems as student_problems
    from test_self_distill import write_recipe as student_recipe

    from flows.self_distill import self_distill

    rows = student_problems(tmp_path / "problems.jsonl")
    script = ScriptedStudent(rows)

    def one_empty(body):  # p2's sample 1 (right, by the script) comes back empty
        if body["model"].startswith("student") and problem_text(body, list(script.rows)) == rows[2]["problem"] \
                and body["seed"] - SEED == 1:
            return Reply(content="")
        return script(body)

    out = tmp_path / "out"
    with FakeOpenAIServer(one_empty) as server:
        recipe = student_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, out)
        result = asyncio.run(self_distill(str(recipe)))
    samples = datasets.load_dataset(str(out / "self_distill" / "round-1-samples"), split="train")
    (empty,) = [s for s in samples if s["problem_id"] == "p2" and s["sample"] == 1]
    assert not empty["correct"] and empty["grade_reason"].startswith("empty_answer"), empty
    assert result["rounds"][0]["samples"] == len(samples) == 20

    shutil.rmtree(out / ".distillery" / "prefect-results")  # resampled: from the journal only
    (out / ".distillery" / "self_distill" / "round-1.json").unlink()
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = student_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, out)
        again = asyncio.run(self_distill(str(recipe)))
    assert dead.requests == [] and again["rounds"][0]["examples"] == result["rounds"][0]["examples"]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(("garbage", "cause"), [
    ("<html><body>502 Bad Gateway</body></html>", "answer is not JSON"),
    (json.dumps({"id": "x", "choices": []}), "answer has no choices"),
    ('{"choices": [{"message": {"content": "The answer is', "answer is not JSON"),
])
def test_a_broken_answer_still_fails_naming_stage_shard_problem_endpoint_and_cause(tmp_path, garbage, cause):
    from flows.dualdistill import dualdistill
    from flows.orchestration.runs import RunFailed

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    script = ScriptedTeachers(rows)

    def broken(body):
        if teacher_role(body) == "reasoning" and problem_text(body, list(script.by_text)) == rows[2]["problem"]:
            return Reply(raw_body=garbage)
        return script(body)

    with FakeOpenAIServer(broken) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        with pytest.raises(RunFailed) as failure:
            asyncio.run(dualdistill(str(recipe)))
    message = str(failure.value)
    for part in ("stage answer[reasoning]", "shard-00000", f"problem {rows[2]['id']}", server.base_url, cause,
                 "gave up after 2 attempts"):
        assert part in message, message
