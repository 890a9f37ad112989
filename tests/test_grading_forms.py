"""The grader class by class (issue 22): each form graded right where it should and wrong
where it must, in the answer formats our two teachers write."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.grading import Grader, audit_jsonl, grade
from flows.grading.compare import math_verify_alone
from flows.grading.forms import decimal_matches, parts
from flows.publishing.report import summarise, wrong_reasons_markdown
from flows.publishing.rounds import RowFigures
from flows.stages.shards import grade_shard
from schemas.records import Problem, Trajectory


def reasoning(answer: str) -> str:
    return f"<think>Let me work it out.</think>\nSo the result follows.\n<answer>\\boxed{{{answer}}}</answer>"


def tool(answer: str) -> str:
    return ("I will compute it.\n<code>\nprint(1 + 1)\n</code>\n<executor>\n2\n</executor>\n"
            f"The program confirms it.\n<answer>\\boxed{{{answer}}}</answer>")


FORMATS = [reasoning, tool]

# (gold, answer) pairs the grader must call right
RIGHT = {
    "matrix": [
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\left[\begin{array}{cc} 1 & 2 \\ 3 & 4 \end{array}\right]"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
        (r"\begin{pmatrix} \frac{1}{2} & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 0.5 & 2 \\ 3 & 4 \end{pmatrix}"),
    ],
    "equation": [
        (r"3x - 6y = 12", r"y = \frac{x}{2} - 2"),
        (r"y = \frac{x}{2} - 2", r"x - 2y = 4"),
        (r"x^2 + y^2 = 25", r"y^2 + x^2 - 25 = 0"),
        (r"x = 5", r"5"),
        (r"5", r"x = 5"),
        (r"y = 2x + 3", r"y=2x+3"),
    ],
    "degrees inside an expression": [
        (r"-\cos\theta", r"\cos(180^\circ - \theta)"),
        (r"\frac{1}{2}", r"\sin 30^\circ"),
        (r"30", r"30^\circ"),
        (r"30^\circ", r"30"),
        (r"30, 150", r"30^\circ, 150^\circ"),
    ],
    "thousands with \\!": [
        (r"2500000", r"2,\!500,\!000"),
        (r"2,\!500,\!000", r"2500000"),
        (r"2,\!500,\!000", r"2{,}500{,}000"),
    ],
    "mixed number": [
        (r"2\frac34", r"2 3/4"),
        (r"2 3/4", r"\frac{11}{4}"),
        (r"\frac{11}{4}", r"2\frac{3}{4}"),
        (r"-2\frac{3}{4}", r"-\frac{11}{4}"),
    ],
    "imaginary unit": [
        (r"2i", r"(1+i)^2"),
        (r"3+4i", r"(2+i)^2"),
        (r"-1", r"i^2"),
        (r"1+i", r"i+1"),
    ],
    "multi-part": [
        (r"3, 5", r"3 \quad 5"),
        (r"3, 5", r"3 \text{ and } 5"),
        (r"3 \quad 5", r"3, 5"),
        (r"3 and 5", r"5, 3"),
    ],
    "primes and letters": [
        (r"B'", r"B'"),
        (r"\text{(B)}", r"B"),
        (r"(C)", r"(c)"),
        (r"e", r"e"),
        (r"f'(x)", r"f'(x)"),
    ],
    "signed interval": [
        (r"-(2, 5]", r"-(2,5]"),
        (r"(-5, -2]", r"(-5, -2]"),
    ],
    "clock time": [
        (r"7:05:00", r"07:05:00"),
        (r"7:05", r"07:05"),
        (r"19:05", r"7:05 pm"),
        (r"7:05 \text{ p.m.}", r"19:05"),
    ],
    # found by running other projects' grading suites through ours
    "assignments and ratios": [
        (r"1000", r"x = 1,000"),
        (r"1000", r"n = 1\,000"),
        (r"12000023", r"x = 12,\!000,\!023"),
        (r"S_{MBCN}:S=7:32", r"7:32"),
        (r"11:21", r"V_{1}:V_{2}=11:21"),
        (r"\frac{71}{6}", r"+11 5/6"),
        (r"\{1,2,3\}", r"\{3, 2, 1\}"),
        (r"\frac{7}{25}", r"28\%"),  # a percentage of the gold's value
        (r"28", r"28\%"),  # or the gold counts in percent
    ],
    "long decimal": [
        (r"\frac17", r"0.142857142857"),
        (r"\frac17", r"0.142857"),
        (r"\frac23", r"0.666666"),  # truncated at its last digit
        (r"\frac23", r"0.666667"),  # rounded at its last digit
        (r"\sqrt{2}", r"1.41421356"),
        (r"\pi", r"3.14159265"),
        (r"0.333333", r"\frac{1}{3}"),
    ],
}

# (gold, answer) pairs the grader must call wrong
WRONG = {
    "matrix": [
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 & 3 & 4 \end{pmatrix}"),
        (r"\begin{pmatrix} 1 & 6 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}"),
        (r"\begin{pmatrix} \frac{1}{3} & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 0.33 & 2 \\ 3 & 4 \end{pmatrix}"),
    ],
    "equation": [
        (r"x = 2", r"y = 2"),
        (r"y = 2", r"x = 2"),
        (r"3x - 6y = 12", r"y = \frac{x}{2} + 2"),
        (r"y = x^2", r"y = x^3"),
    ],
    "degrees inside an expression": [
        (r"\cos\theta", r"\cos(180^\circ - \theta)"),
        (r"\frac{1}{2}", r"\sin 60^\circ"),
        (r"30", r"\frac{\pi}{6}"),
    ],
    "thousands with \\!": [
        (r"2500000", r"2,\!500"),
        (r"2,\!500,\!000", r"250000"),
    ],
    "mixed number": [
        (r"2\frac34", r"2 4/3"),  # not a mixed number: the fraction is not proper
        (r"2\frac34", r"\frac{3}{2}"),  # 2 · 3/4 is not how a mixed number reads
        (r"2 3/4", r"2\frac{3}{5}"),
    ],
    "imaginary unit": [
        (r"2i", r"2"),
        (r"3-4i", r"(2+i)^2"),
        (r"2i", r"(1-i)^2"),
    ],
    "multi-part": [
        (r"3, 5", r"3 \quad 6"),
        (r"3, 5", r"3"),
        (r"3", r"3 \text{ and } 5"),
    ],
    "primes and letters": [
        (r"B", r"B'"),
        (r"B'", r"B"),
        (r"f'(x)", r"f(x)"),
        (r"B", r"b"),
        (r"E", r"e"),
        (r"e", r"2.718281828"),
        (r"\text{(E)}", r"2.718281828459045"),
    ],
    "signed interval": [
        (r"5", r"-(2, 5]"),
        (r"(2, 5]", r"-(2, 5]"),
        (r"-2", r"-(2, 5]"),
        (r"(-5, -2]", r"-(2, 5]"),
    ],
    "clock time": [
        (r"14:10", r"7:05"),
        (r"1.4", r"7:05"),
        (r"7:50", r"7:05"),
        (r"12:00:00", r"07:05:00"),
        (r"7:05", r"7:05 pm"),
    ],
    "assignments and ratios": [
        (r"1000", r"x = 1,001"),
        (r"7:32", r"V_{1}:V_{2}=7:23"),
        (r"\frac{71}{6}", r"-11 5/6"),
        (r"28", r"0.28\%"),
        (r"\frac{7}{25}", r"28"),  # without a percent sign 28 is 28
    ],
    "long decimal": [
        (r"\frac17", r"0.14"),
        (r"\frac17", r"0.14286"),  # right digits, but only five of them
        (r"\frac23", r"0.666668"),
        (r"\frac13", r"0.333"),
        (r"\sqrt{2}", r"1.4142"),
        (r"\sqrt{2}", r"1.41421357"),
        (r"1", r"1.0000000000000000001"),
        (r"\frac{1}{3}", r"-0.333333"),
    ],
}


def _cases(table: dict[str, list[tuple[str, str]]]) -> list:
    return [pytest.param(gold, answer, fmt, id=f"{name}|{gold}|{answer}|{fmt.__name__}")
            for name, pairs in table.items() for gold, answer in pairs for fmt in FORMATS]


@pytest.mark.parametrize(("gold", "answer", "fmt"), _cases(RIGHT))
def test_right(gold: str, answer: str, fmt) -> None:  # noqa: ANN001 - a formatter
    verdict = grade(fmt(answer), gold)
    assert verdict.correct, verdict


@pytest.mark.parametrize(("gold", "answer", "fmt"), _cases(WRONG))
def test_wrong(gold: str, answer: str, fmt) -> None:  # noqa: ANN001 - a formatter
    verdict = grade(fmt(answer), gold)
    assert not verdict.correct, verdict
    assert verdict.reason  # always with its reason


def test_the_worker_pool_agrees_with_grade() -> None:
    pairs = [(fmt(answer), gold) for table in (RIGHT, WRONG) for cases in table.values()
             for gold, answer in cases for fmt in FORMATS]
    with Grader(workers=1) as grader:
        assert [v.correct for v in grader.grade_many(pairs)] == [grade(*pair).correct for pair in pairs]


# ------------------------------------------------------------------ boxes, hedges and prose


def test_an_answer_split_over_boxes_is_joined_for_a_multi_part_gold() -> None:
    response = "<think>two parts</think><answer>(a) \\boxed{3} and (b) \\boxed{5}</answer>"
    verdict = grade(response, "3, 5")
    assert verdict.correct, verdict
    assert verdict.extracted == "3, 5"
    assert not grade(response, "3, 6").correct


def test_two_values_boxed_for_one_answer_are_a_hedge() -> None:
    response = "<think>unsure</think><answer>It is \\boxed{3} or maybe \\boxed{4}.</answer>"
    for gold in ("3", "4"):
        verdict = grade(response, gold)
        assert not verdict.correct
        assert verdict.reason.startswith("hedge: 2 different boxed answers")
    three = "<think>x</think><answer>\\boxed{3}, \\boxed{4} or \\boxed{5}</answer>"
    assert grade(three, "3, 4").reason.startswith("hedge: 3 different boxed answers")


def test_a_set_boxed_member_by_member_is_the_set() -> None:
    for response in ("<answer>\\boxed{1} and \\boxed{2} and \\boxed{3}</answer>",
                     "<answer>\\boxed{3},\\boxed{2},\\boxed{1}</answer>"):
        assert grade(response, "\\{1,2,3\\}").correct
        assert not grade(response, "\\{1,2\\}").correct


def test_a_stray_backslash_at_the_end_is_dropped() -> None:
    assert grade("<answer>185\\</answer>", "185").correct
    assert grade("<answer>\\boxed{185\\ }</answer>", "185").correct
    assert grade("<answer>\\boxed{185}</answer>", "185\\").correct


def test_an_escaped_dollar_is_not_a_math_delimiter() -> None:
    verdict = grade("<answer>The price is $\\$10$.</answer>", "10")
    assert verdict.correct, verdict
    assert not grade("<answer>The price is $\\$12$.</answer>", "10").correct


def test_the_same_value_boxed_twice_is_one_answer() -> None:
    response = "<think>x</think>We get \\boxed{\\frac{1}{2}}, that is \\boxed{0.5}... no: \\boxed{\\frac12}."
    assert not grade(response, "1/2").correct  # 0.5 is written differently: two boxed values
    assert grade("<think>x</think>So \\boxed{4}; indeed \\boxed{4}.", "4").correct


def test_prose_in_the_answer_block_takes_the_last_math_span() -> None:
    verdict = grade("<think>x</think><answer>so $x \\le 3$.</answer>", "x \\le 3")
    assert verdict.correct, verdict
    assert verdict.extracted == "x \\le 3"
    assert grade("<answer>We have $a = 1$, hence \\(x = 7\\).</answer>", "7").correct
    assert not grade("<answer>so $x \\le 4$.</answer>", "x \\le 3").correct
    assert not grade("<answer>it is $3$ and not $4$</answer>", "3").correct  # the last span is the answer


# ----------------------------------------------------------------------- the decimal rule


@pytest.mark.parametrize(
    ("decimal", "exact", "matches"),
    [
        ("0.142857", Fraction(1, 7), True),  # six significant digits, truncated
        ("0.1428571", Fraction(1, 7), True),  # rounded (…5714 → …571)
        ("0.14286", Fraction(1, 7), False),  # five significant digits: too few
        ("0.142858", Fraction(1, 7), False),  # neither truncated nor rounded
        ("0.000000142857", Fraction(1, 7_000_000), True),  # leading zeros are not significant
        ("333333.3", Fraction(1_000_000, 3), True),
        ("-0.666667", Fraction(-2, 3), True),
        ("0.666667", Fraction(-2, 3), False),
        ("0.5", Fraction(1, 2), True),  # equal exactly: no digit count needed
        ("2.50", Fraction(5, 2), True),
    ],
)
def test_decimal_rule_both_sides(decimal: str, exact: Fraction, matches: bool) -> None:
    assert decimal_matches(decimal, exact) is matches


def test_parts_split_only_at_the_top_level() -> None:
    assert parts("3 \\quad 5") == ["3", "5"]
    assert parts("3 and 5") == ["3", "5"]
    assert parts("(1, 2), [3, 4)") == ["(1, 2)", "[3, 4)"]
    assert parts("\\{1, 2\\}") == ["\\{1, 2\\}"]
    assert parts("\\frac{1}{2}, x") == ["\\frac{1}{2}", "x"]
    assert parts("band") == ["band"]


# --------------------------------------------------------------------------- the audit


def _audit_file(tmp_path) -> tuple:  # noqa: ANN001 - pytest's tmp_path
    """Our class cases as a JSONL file, with the (gold, answer) of each line."""
    cases = [(gold, answer) for table in (RIGHT, WRONG) for pairs in table.values() for gold, answer in pairs]
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps({"answer": gold, "response": reasoning(answer)}) + "\n" for gold, answer in cases))
    return path, cases


def test_audit_lists_where_math_verify_alone_disagrees(tmp_path) -> None:  # noqa: ANN001
    path, cases = _audit_file(tmp_path)
    with path.open() as lines:
        audit = audit_jsonl(lines, source=str(path), workers=0)
    assert audit.graded == len(cases)
    listed = {row.line: row for rows in audit.by_reason.values() for row in rows}
    # a primed name: math-verify alone drops the prime and calls B' right for B; we do not
    line = cases.index(("B", "B'")) + 1
    assert listed[line].ours is False and listed[line].math_verify is True
    assert "not_equivalent (as text: primed name) [rule]" in audit.by_reason
    # every listed line really is graded both ways, and every unlisted one the same way
    for number, (gold, answer) in enumerate(cases, start=1):
        ours = grade(reasoning(answer), gold).correct
        alone = math_verify_alone(reasoning(answer), gold).equivalent
        assert (number in listed) == (ours != alone), (gold, answer)


def test_grade_audit_command_prints_the_groups(tmp_path) -> None:  # noqa: ANN001
    path, cases = _audit_file(tmp_path)
    result = CliRunner().invoke(app, ["grade", "--audit", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{len(cases)} answers graded; math-verify alone grades" in result.output
    assert "primed name" in result.output and "clock time" in result.output


def test_graded_rows_keep_both_verdicts_and_the_summary_counts_disagreements() -> None:
    problems = [Problem(id="p1", problem="Which point?", answer="B"), Problem(id="p2", problem="1+2?", answer="3")]
    answers = [
        Trajectory(problem_id="p1", teacher="reasoning", model="m", text=reasoning("B'"), finish_reason="stop"),
        Trajectory(problem_id="p2", teacher="reasoning", model="m", text=reasoning("3"), finish_reason="stop"),
    ]
    with Grader(workers=0) as grader:
        graded = grade_shard(answers, problems, grader)
    assert [(g.correct, g.math_verify_correct) for g in graded] == [(False, True), (True, True)]
    summary = summarise("run", 2, graded, [], [])
    assert summary.teachers["reasoning"].disagree_with_math_verify == 1
    assert "Graded the other way by math-verify alone: reasoning 1" in wrong_reasons_markdown(summary)
    figures = RowFigures.of(graded, [], [])
    assert figures.disagree_with_math_verify == 1
