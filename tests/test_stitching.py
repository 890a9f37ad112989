from __future__ import annotations

import pytest

from flows.inputs.prompts import load_prompt
from flows.stages.stitching import case_of, first_teachers, stitch_pair, stitch_shard
from schemas.records import GradedTrajectory, Problem

TRANSITIONS = load_prompt("transitions")
PROBLEM = Problem(id="p1", problem="What is 2+3?", answer="5")
TOOL_TEXT = "Add them.\n<code>\nprint(2+3)\n</code>\n<executor>\n5\n</executor>\n<answer>\\boxed{5}</answer>"
REASONING_TEXT = "<think>\n2+3=5\n</think>\n<answer>\\boxed{5}</answer>"


def graded(teacher: str, correct: bool, problem_id: str = "p1") -> GradedTrajectory:
    text = TOOL_TEXT if teacher == "tool" else REASONING_TEXT
    return GradedTrajectory(
        problem_id=problem_id, teacher=teacher, model=f"{teacher}-model", text=text, finish_reason="stop",
        correct=correct, extracted="5" if correct else "6", grade_reason="x",
    )


@pytest.mark.parametrize(
    ("g1", "g2", "case"),
    [(True, True, "both_correct"), (True, False, "first_correct"), (False, True, "second_corrects"),
     (False, False, "both_wrong")],
)
def test_case_table(g1, g2, case):
    assert case_of(g1, g2) == case


@pytest.mark.parametrize("first", ["tool", "reasoning"])
def test_both_correct_is_first_verification_second(first):
    second = "reasoning" if first == "tool" else "tool"
    row = stitch_pair(PROBLEM, graded(first, True), graded(second, True), TRANSITIONS)
    phrase = TRANSITIONS.data["phrases"]["both_correct"][first]
    first_text = graded(first, True).text.replace("<answer>", "").replace("</answer>", "")
    assert row.text == f"{first_text}\n\n{phrase}\n\n{graded(second, True).text}"
    assert row.case == "both_correct" and row.mask_until == 0 and row.transition == phrase
    assert row.text.count("<answer>") == 1 and row.text.endswith("</answer>")
    assert (row.first_teacher, row.second_teacher, row.g1, row.g2) == (first, second, True, True)


@pytest.mark.parametrize("first", ["tool", "reasoning"])
def test_first_correct_is_first_alone(first):
    second = "reasoning" if first == "tool" else "tool"
    row = stitch_pair(PROBLEM, graded(first, True), graded(second, False), TRANSITIONS)
    assert row.text == graded(first, True).text
    assert (row.case, row.mask_until, row.transition) == ("first_correct", 0, "")


@pytest.mark.parametrize("first", ["tool", "reasoning"])
def test_second_corrects_masks_the_failed_attempt(first):
    second = "reasoning" if first == "tool" else "tool"
    row = stitch_pair(PROBLEM, graded(first, False), graded(second, True), TRANSITIONS)
    phrase = TRANSITIONS.data["phrases"]["second_corrects"][first]
    assert row.case == "second_corrects"
    assert row.text[row.mask_until:].startswith(phrase)
    assert row.text[: row.mask_until].rstrip() == graded(first, False).text.replace("<answer>", "").replace("</answer>", "")
    assert row.text.endswith(graded(second, True).text)
    assert [(m.role, m.content) for m in row.messages] == [("user", PROBLEM.problem), ("assistant", row.text)]
    untrained = row.messages[-1].train_detail[0]
    assert (untrained.begin_offset, untrained.end_offset, untrained.train) == (0, row.mask_until - 1, False)


def test_both_wrong_is_rejected_with_reasons():
    row = stitch_pair(PROBLEM, graded("tool", False), graded("reasoning", False), TRANSITIONS)
    assert row.case == "both_wrong" and row.reason.startswith("both_wrong: tool:")
    assert row.first_text == TOOL_TEXT and row.second_text == REASONING_TEXT


def test_system_prompt_goes_first_in_messages():
    row = stitch_pair(PROBLEM, graded("tool", True), graded("reasoning", False), TRANSITIONS, system_prompt="Be exact.")
    assert (row.messages[0].role, row.messages[0].content, row.messages[0].train_detail) == ("system", "Be exact.", None)


@pytest.mark.parametrize(("order", "expected"), [("tool_first", ["tool"]), ("reasoning_first", ["reasoning"]),
                                                 ("both", ["tool", "reasoning"])])
def test_fixed_orders(order, expected):
    assert first_teachers(order, "p1") == expected


def test_random_order_is_seeded_and_mixed():
    ids = [f"p{i}" for i in range(200)]
    picks = [first_teachers("random", i, seed=3)[0] for i in ids]
    assert picks == [first_teachers("random", i, seed=3)[0] for i in ids]
    assert 60 < picks.count("tool") < 140
    assert picks != [first_teachers("random", i, seed=4)[0] for i in ids]


def test_stitch_shard_both_orders_counts_and_single_rejection():
    problems = [Problem(id=f"p{i}", problem=f"q{i}", answer="5") for i in range(4)]
    grades = {"p0": (True, True), "p1": (True, False), "p2": (False, True), "p3": (False, False)}
    trajectories = [graded(t, grades[p.id][t == "reasoning"], p.id) for p in problems for t in ("tool", "reasoning")]
    composites, rejected = stitch_shard(problems, trajectories, TRANSITIONS, "both")
    cases = sorted((c.id, c.first_teacher, c.case) for c in composites)
    assert cases == [
        ("p0", "reasoning", "both_correct"), ("p0", "tool", "both_correct"),
        ("p1", "reasoning", "second_corrects"), ("p1", "tool", "first_correct"),
        ("p2", "reasoning", "first_correct"), ("p2", "tool", "second_corrects"),
    ]
    assert [(r.id, r.case) for r in rejected] == [("p3", "both_wrong")]


def test_stitch_shard_names_a_missing_answer():
    with pytest.raises(KeyError, match="no graded reasoning answer"):
        stitch_shard([PROBLEM], [graded("tool", True)], TRANSITIONS, "tool_first")
