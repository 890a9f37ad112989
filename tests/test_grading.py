"""Tests for flows/grading/: extraction, equivalence, traps, threads, worker processes, JSONL."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

from flows.grading import (
    GRADER_VERSION,
    GradeInputError,
    Grader,
    extract_final_answer,
    grade,
    grade_jsonl,
    math_equivalent,
    normalise,
)
from schemas.records import Verdict


def boxed(answer: str) -> str:
    return f"<think>reasoning</think>\nSo the result follows.\n<answer>\\boxed{{{answer}}}</answer>"


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>hmm</think><answer>\\boxed{42}</answer>", ("42", "answer_tag_boxed")),
        ("<think>hmm</think><answer> 42 </answer>", ("42", "answer_tag")),
        ("<answer>first \\boxed{1} then \\boxed{2}</answer>", ("2", "answer_tag_boxed")),
        ("We get \\boxed{3}. Finally \\boxed{4}.", ("4", "boxed_outside_reasoning")),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", ("\\frac{1}{2}", "answer_tag_boxed")),
        ("<answer>\\boxed{\\{1, 2\\}}</answer>", ("\\{1, 2\\}", "answer_tag_boxed")),
        ("The answer is $\\boxed 5$.", ("5", "boxed_outside_reasoning")),
        ("<answer>\\fbox{7}</answer>", ("7", "answer_tag_boxed")),
        # the <answer> tag wins over a later \boxed outside it
        ("<answer>8</answer> check: \\boxed{9}", ("8", "answer_tag")),
        # an unclosed \boxed{ is skipped in favour of the last complete one
        ("\\boxed{5} and then \\boxed{6", ("5", "boxed_outside_reasoning")),
        # the prompt opened <think>: everything up to the orphan </think> is reasoning
        ("I guess \\boxed{1}\n</think>\n<answer>\\boxed{2}</answer>", ("2", "answer_tag_boxed")),
        ("I guess \\boxed{1}\n</think>\nno answer here", (None, "no_answer")),
    ],
)
def test_extraction(text: str, expected: tuple[str | None, str]) -> None:
    extracted, reason = extract_final_answer(text)
    assert extracted == expected[0]
    assert reason.startswith(expected[1])


def test_answer_only_inside_think_is_no_answer() -> None:
    text = "<think>The answer is \\boxed{5}. <answer>5</answer></think> I am not sure."
    assert extract_final_answer(text) == (
        None,
        "no_answer: no <answer> tag and no \\boxed{} outside <think>/<code>/<executor>",
    )
    assert grade(text, "5").correct is False


def test_unclosed_think_hides_everything_after_it() -> None:
    text = "<think>Let me compute. So far \\boxed{5} <answer>5</answer> and then"
    assert extract_final_answer(text) == (None, "truncated: unclosed <think>")
    verdict = grade(text, "5")
    assert verdict == Verdict(correct=False, extracted=None, reason="truncated: unclosed <think>")


def test_truncated_answer_counts_only_through_a_complete_box() -> None:
    complete_box = extract_final_answer("<think>x</think><answer>\\boxed{12}")
    assert complete_box == ("12", "boxed_outside_reasoning")
    no_box = extract_final_answer("<think>x</think><answer>12")
    assert no_box[0] is None and no_box[1].startswith("truncated: unclosed <answer>")


TOOL_TRAJECTORY = """I will compute the sum with code.
<code>
print(sum(range(1, 11)))  # \\boxed{99} in a comment does not count
</code>
<executor>
55
\\boxed{56}
</executor>
The program printed 55, so the sum is 55.
<answer>\\boxed{55}</answer>"""


def test_tool_teacher_format() -> None:
    assert extract_final_answer(TOOL_TRAJECTORY) == ("55", "answer_tag_boxed")
    assert grade(TOOL_TRAJECTORY, "55").correct


def test_boxed_in_executor_or_code_output_does_not_count() -> None:
    text = "<code>print(r'\\boxed{7}')</code>\n<executor>\\boxed{7}</executor>\nDone."
    assert extract_final_answer(text)[0] is None
    assert grade(text, "7").correct is False
    truncated_tool_call = "Let me check.\n<code>\nprint('\\boxed{7}')"
    assert extract_final_answer(truncated_tool_call) == (None, "truncated: unclosed <code>")


def test_two_different_boxed_values_for_one_answer_are_a_hedge() -> None:
    # before issue 22 the last box won; a response that boxes two values offers both, and
    # grading it right for either would reward the hedge
    text = "<think>x</think>First guess \\boxed{3}, but on reflection \\boxed{4}."
    for gold in ("4", "3"):
        verdict = grade(text, gold)
        assert not verdict.correct and verdict.reason.startswith("hedge: 2 different boxed answers"), verdict
    assert grade("<think>x</think>So \\boxed{4}. Checking: \\boxed{4}.", "4").correct  # the same value twice


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("1/3", "\\frac{1}{3}"),
        ("\\frac{1}{3}", "1/3"),
        ("12/36", "1/3"),
        ("\\frac{12}{36}", "\\frac13"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("\\tfrac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("0.333333", "1/3"),  # math-verify rounds to 6 decimals when a decimal is involved
        ("12345", "12,345"),
        ("12,345", "12345"),
        ("1,000,000", "1000000"),
        ("12{,}345", "12345"),
        ("12\\,345", "12345"),
        ("7", "007"),
        ("-007", "-7"),
        ("5 \\text{ cm}", "5"),
        ("5", "\\text{5 cm}"),
        ("5\\mathrm{kg}", "5"),
        ("12 square feet", "12"),
        ("3 cm^2", "3"),
        ("\\$5", "5"),
        ("5", "\\$5"),
        ("50\\%", "50"),
        ("30^\\circ", "30"),
        ("$5$", "5"),
        ("\\(5\\)", "5"),
        ("5.", "5"),
        ("The final answer is 5", "5"),
        ("x=3", "3"),
        ("3", "x = 3"),
        ("x = 3", "x=3"),
        ("1, 2", "1,2"),
        ("2, 1", "1,2"),  # a bare list is the set of solutions: order does not matter
        ("\\{1, 2\\}", "1,2"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("(1, 2)", "(1,2)"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("[1, 2)", "[1,2)"),
        ("-5", "-5"),
        ("-\\frac{1}{2}", "\\frac{-1}{2}"),
        ("123456789012345678901", "123456789012345678901"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("\\pi", "\\pi"),
        ("\\infty", "\\infty"),
        ("1.0", "1"),
    ],
)
def test_equivalent(answer: str, gold: str) -> None:
    verdict = grade(boxed(answer), gold)
    assert verdict.correct, verdict
    assert verdict.extracted == answer
    assert verdict.reason.split(":")[0] in {"equal_after_normalisation", "equivalent"}


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("10", "1"),  # the reference code's substring bug
        ("1", "10"),
        ("11", "1"),
        ("-5", "5"),
        ("123456789012345678900", "123456789012345678901"),
        ("0.333", "1/3"),  # not within math-verify's 6-decimal rounding
        ("\\frac{1}{4}", "\\frac{1}{3}"),
        ("12", "1,2"),
        ("12, 345", "12345"),  # comma and space: a two-item list, not a thousands separator
        ("(2, 1)", "(1,2)"),  # parentheses: an ordered pair
        ("1, 2, 3", "1,2"),
        ("3 x", "3"),  # a single letter is a variable, not a unit
        ("2\\sqrt{2}", "\\sqrt{2}"),
    ],
)
def test_not_equivalent(answer: str, gold: str) -> None:
    verdict = grade(boxed(answer), gold)
    assert not verdict.correct, verdict
    assert verdict.reason.startswith("not_equivalent: ")


def test_reason_names_both_values() -> None:
    assert grade(boxed("10"), "1").reason == "not_equivalent: 10 vs 1"


def test_fast_path_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.grading.compare as compare

    def explode(answer: str, gold: str) -> tuple[bool, str]:
        raise AssertionError("math-verify should not be needed")

    monkeypatch.setattr(compare, "math_equivalent", explode)
    assert grade(boxed("12,345"), "12345").reason == "equal_after_normalisation"
    assert grade(boxed("\\frac{12}{36}"), "1/3").reason == "equivalent: exact_rational"
    assert grade(boxed("10"), "1").reason == "not_equivalent: 10 vs 1"


def test_normalise_examples() -> None:
    assert normalise("$\\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert normalise("\\boxed{12,345}") == "12345"
    assert normalise("1,2") == normalise("1, 2") == "1, 2"
    assert normalise("\\text{5 cm}") == "5"


# ----------------------------------------------------------------------------------- traps


@pytest.mark.parametrize(
    "answer",
    [
        "Let's solve this problem step by step.",
        "Let's solve this step by step.",
        "Solution",
        "Solution:",
        ":",
        "Answer:",
        "Step 1",
        "I think",
        "...",
        " - ",
    ],
)
def test_master_keys_are_wrong(answer: str) -> None:
    for text in (f"<answer>{answer}</answer>", f"<answer>\\boxed{{{answer}}}</answer>"):
        verdict = grade(text, answer)  # even when the gold were the opener itself
        assert not verdict.correct
        assert verdict.reason.startswith("master_key: "), verdict


def test_curly_apostrophe_opener_is_a_master_key() -> None:
    verdict = grade("<answer>Let’s solve this step by step.</answer>", "5")
    assert verdict.reason.startswith("master_key: ")


@pytest.mark.parametrize(
    "answer",
    ["5 " + "a" * 3000 + "1", "5 " + "ab " * 3000 + "1", "x = " + "1+" * 5000 + "1"],
)
def test_long_prose_answers_are_graded_quickly(answer: str) -> None:
    # Once a regex backtracked for minutes here, and sympy takes seconds on such input.
    start = time.perf_counter()
    verdict = grade(f"<answer>{answer}</answer>", "5")
    assert time.perf_counter() - start < 1.0
    assert verdict.reason.startswith("not_equivalent: ") and "too long" in verdict.reason


@pytest.mark.parametrize(
    "text", ["<answer></answer>", "<answer>   </answer>", "<answer>\\boxed{}</answer>"]
)
def test_empty_answers_are_wrong(text: str) -> None:
    verdict = grade(text, "5")
    assert not verdict.correct
    assert verdict.reason.startswith("empty_answer")


def test_empty_after_normalisation_is_wrong() -> None:
    verdict = grade("<answer>$$</answer>", "5")
    assert (verdict.correct, verdict.reason.split(":")[0]) == (False, "empty_answer")


def test_no_answer_at_all() -> None:
    verdict = grade("I could not solve it.", "5")
    assert verdict == Verdict(correct=False, extracted=None, reason=verdict.reason)
    assert verdict.reason.startswith("no_answer: ")


def test_verdict_always_carries_extracted_and_reason() -> None:
    verdict = grade(boxed("\\frac{1}{2}"), "0.5")
    assert verdict.extracted == "\\frac{1}{2}" and verdict.reason


# --------------------------------------------------------------------------- exact numbers

TWO_100 = "1267650600228229401496703205376"  # 2^100
TWO_100_PLUS_1 = "1267650600228229401496703205377"


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        # math-verify 0.9 alone graded each of these RIGHT: it compares with a tolerance
        ("\\frac{1}{2^{101}}", "\\frac{1}{2^{100}}"),
        ("-\\frac{1}{2^{100}}", "-\\frac{1}{2^{101}}"),
        ("\\frac{1}{100!}", "\\frac{1}{100!+1}"),
        ("\\frac{1}{10^{30}}", "\\frac{1}{10^{30}+1}"),
        ("10^{-30}", "10^{-31}"),
        ("10^{30}+10^{-30}", "10^{30}"),
        ("\\sqrt{10^{40}+1}", "10^{20}"),
        ("\\sqrt{10^{40}+1}", "\\sqrt{10^{40}}"),
        ("\\sqrt{2}\\cdot 10^{-50}", "\\sqrt{3}\\cdot 10^{-50}"),
        ("\\sqrt{5+2\\sqrt{6}}+10^{-40}", "\\sqrt{2}+\\sqrt{3}"),
        ("\\frac{\\pi}{10^{30}}", "\\frac{\\pi}{10^{30}+1}"),
        ("(\\frac{1}{2^{101}}, 1)", "(\\frac{1}{2^{100}}, 1)"),  # open interval or pair
        ("[\\frac{1}{2^{101}}, 1]", "[\\frac{1}{2^{100}}, 1]"),
        ("(\\frac{1}{2^{101}}, 1]", "(\\frac{1}{2^{100}}, 1]"),
        ("\\{\\frac{1}{2^{101}}, 1\\}", "\\{\\frac{1}{2^{100}}, 1\\}"),
        ("\\frac{1}{2^{101}}, 1", "\\frac{1}{2^{100}}, 1"),
        ("\\{2^{-101}\\}", "2^{-100}"),
        ("\\frac{1}{2^{102}}, \\frac{1}{2^{101}}", "(\\frac{1}{2^{100}}, \\frac{1}{2^{101}})"),
        # math-verify alone already graded these wrong; they must stay wrong
        (TWO_100_PLUS_1, "2^{100}"),
        ("2^{100}", TWO_100_PLUS_1),
        ("2^{100}+1", "2^{100}"),
        ("3^{100}", "3^{100}+1"),
        ("100!+1", "100!"),
        ("100!", "100!+1"),
        ("1000!", "1000!+1"),
        ("10^{30}+1", "10^{30}"),
        ("1000000000000000000000000000001", "10^{30}"),
        ("12345678901234567890123456789012345678901", "12345678901234567890123456789012345678900"),
        ("\\binom{60}{30}+1", "\\binom{60}{30}"),
        ("118264581564861425", "\\binom{60}{30}"),
        ("\\binom{100}{50}", "\\binom{100}{50}+1"),
        ("\\frac{1}{\\binom{60}{30}}", "\\frac{1}{\\binom{60}{30}+1}"),
        ("\\frac{2^{100}+1}{3}", "\\frac{2^{100}}{3}"),
        ("1+\\frac{1}{2^{100}}", "1"),
        ("\\frac{1}{2^{100}}", "0"),
        ("\\sqrt{2}\\cdot 10^{50}+1", "\\sqrt{2}\\cdot 10^{50}"),
        ("141421356237309504880168872420969807856967187537694", "\\sqrt{2}\\cdot 10^{50}"),
        ("-2^{100}", "-" + TWO_100_PLUS_1),
        ("-10^{30}-1", "-10^{30}"),
        ("(2^{100}, 1)", f"({TWO_100_PLUS_1}, 1)"),
        ("(10^{30}, 1)", "(10^{30}+1, 1)"),
        ("\\{2^{100}, 1\\}", f"\\{{{TWO_100_PLUS_1}, 1\\}}"),
        ("2^{100}, 1", f"{TWO_100_PLUS_1}, 1"),
        ("[2^{100}, 1]", f"[{TWO_100_PLUS_1}, 1]"),
        ("2^{10^{6}}", "2^{1000000}+1"),
    ],
)
def test_size_cannot_fool_the_grader(answer: str, gold: str) -> None:
    verdict = grade(boxed(answer), gold)
    assert not verdict.correct, verdict
    assert verdict.reason.startswith("not_equivalent: ")
    assert (verdict.method, verdict.parse_status) == ("exact", "both")


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        (TWO_100, "2^{100}"),
        ("2^{100}", TWO_100),
        ("-" + TWO_100, "-2^{100}"),
        ("5!", "120"),
        ("\\frac{1}{1024}", "\\frac{1}{2^{10}}"),
        ("2^{-10}", "\\frac{1}{1024}"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("118264581564861424", "\\binom{60}{30}"),
        ("\\frac{100!}{98!}", "9900"),
        ("10^{30}+1", "1000000000000000000000000000001"),
        ("\\sqrt{2}\\cdot 10^{50}", "10^{50}\\sqrt{2}"),
        ("\\sqrt{5+2\\sqrt{6}}", "\\sqrt{2}+\\sqrt{3}"),
        ("\\frac{1}{\\sqrt{3}-1}", "\\frac{\\sqrt{3}+1}{2}"),
        ("\\sqrt[3]{2}\\sqrt[3]{4}", "2"),
        ("\\frac{2\\pi}{4}", "\\frac{\\pi}{2}"),
        ("(2^{100}, 1)", f"({TWO_100}, 1)"),
        (f"1, {TWO_100}", "\\{2^{100}, 1\\}"),
        ("\\{5\\}", "5"),
        ("2^{10^{6}}", "2^{1000000}"),
    ],
)
def test_exact_equalities_stay_right(answer: str, gold: str) -> None:
    verdict = grade(boxed(answer), gold)
    assert verdict.correct, verdict
    assert (verdict.reason, verdict.method, verdict.parse_status) == (
        "equivalent: exact",
        "exact",
        "both",
    )


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        ("0.5, 2^{100}", "\\frac{1}{2}, 2^{100}", True),
        ("2x", "x+x", True),  # a symbol
        ("e^{2}", "e\\cdot e", True),  # exp() is not among the exact forms
        ("(1, 2)", "2, 1", True),  # a pair against a set: math-verify picks the order
        ("2, 1", "(1, 2)", False),
        ("2^{-100}, 2^{-101}", "(2^{-100}, 2^{-101})", True),
    ],
)
def test_math_verify_decides_decimals_symbols_and_order(
    answer: str, gold: str, correct: bool
) -> None:
    verdict = grade(boxed(answer), gold)
    assert verdict.correct is correct, verdict
    assert (verdict.method, verdict.parse_status) == ("math_verify", "both")


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        # a decimal against an exact value: its digits decide (flows.grading.forms.decimal_matches)
        ("0.333333", "\\frac{1}{3}", True),
        ("\\frac{1}{3}", "0.333333", True),
        ("0.3333333333", "\\frac{1}{3}", True),
        ("1.0000000000000000001", "1", False),
    ],
)
def test_decimals_against_exact_values_are_decided_by_their_digits(answer: str, gold: str, correct: bool) -> None:
    verdict = grade(boxed(answer), gold)
    assert verdict.correct is correct, verdict
    assert (verdict.method, verdict.parse_status) == ("decimal", "both")


def test_exact_evaluation_refuses_huge_values() -> None:
    from sympy import Integer, Pow, Rational, factorial

    from flows.grading.exact import exact_value

    nine_nines = Pow(Integer(9), Integer(9), evaluate=False)
    assert exact_value(Pow(Integer(9), nine_nines, evaluate=False)) is None
    assert exact_value(factorial(Integer(10**6), evaluate=False)) is None
    assert exact_value(Pow(Integer(3) ** 5000 + 1, Rational(1, 2), evaluate=False)) is None
    assert exact_value(Pow(Integer(1), Integer(10**100), evaluate=False)) == 1
    assert exact_value(Pow(Integer(0), Integer(-1), evaluate=False)) is None  # zoo


# ------------------------------------------------------------------------ verdict methods


@pytest.mark.parametrize(
    ("response", "gold", "method", "parse_status"),
    [
        ("no answer", "5", "rule", "not_needed"),
        ("<think>cut off", "5", "rule", "not_needed"),
        ("<answer></answer>", "5", "rule", "not_needed"),
        ("<answer>$$</answer>", "5", "rule", "not_needed"),
        ("<answer>Solution:</answer>", "5", "rule", "not_needed"),
        (boxed("5"), "$$", "rule", "not_needed"),
        ("<answer>x = " + "1+" * 5000 + "1</answer>", "5", "rule", "not_needed"),
        (boxed("12,345"), "12345", "normalised_string", "not_needed"),
        (boxed("\\frac{12}{36}"), "1/3", "exact", "both"),
        (boxed("10"), "1", "exact", "both"),
        (boxed("0.5"), "\\frac{1}{2}", "exact", "both"),
        (boxed("2\\sqrt{3}"), "\\sqrt{12}", "exact", "both"),
        (boxed("2x"), "x+x", "math_verify", "both"),
        # math-verify reads these as strings, not values
        ("<answer>\\frac{1}</answer>", "x", "math_verify", "answer_failed"),
        (boxed("x"), "\\frac{1}", "math_verify", "gold_failed"),
        ("<answer>1+</answer>", "\\frac{1}", "math_verify", "neither"),
    ],
)
def test_every_verdict_names_its_rule(
    response: str, gold: str, method: str, parse_status: str
) -> None:
    verdict = grade(response, gold)
    assert (verdict.method, verdict.parse_status) == (method, parse_status), verdict


# --------------------------------------------------------------------------------- threads


def test_grade_works_from_a_worker_thread() -> None:
    # math-verify's own timeouts (signal.alarm) raise ValueError outside the main thread.
    results: list[Verdict] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(grade(boxed("2\\sqrt{3}"), "\\sqrt{12}"))
            results.append(grade(boxed("\\{2, 1\\}"), "1,2"))
            results.append(grade(boxed("1.41421356"), "\\sqrt{2}"))  # parsed, then the digits rule
            results.append(grade(boxed("2x"), "x+x"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not errors
    assert [v.reason for v in results] == [
        "equivalent: exact",
        "equivalent: exact",
        "equivalent: decimal",
        "equivalent: math_verify",
    ]


def test_grader_works_from_a_worker_thread() -> None:
    results: list[list[Verdict]] = []
    with Grader(workers=0) as grader:
        pairs = [(boxed("2\\sqrt{3}"), "\\sqrt{12}")]
        thread = threading.Thread(target=lambda: results.append(grader.grade_many(pairs)))
        thread.start()
        thread.join(timeout=30)
    assert results[0][0].correct


# ------------------------------------------------------------------------ worker processes

PAIRS = [
    (boxed("2\\sqrt{3}"), "\\sqrt{12}"),
    (boxed("10"), "1"),
    ("no answer", "1"),
    (boxed("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}"),
    (boxed("9^{9^{9}}"), "5"),  # sympy computes this integer forever, holding the GIL
    (boxed("\\{1, 2\\}"), "2,1"),
    (boxed("\\pi"), "3"),
]


def test_grader_in_process_matches_grade() -> None:
    pairs = [p for p in PAIRS if "9^" not in p[0]]
    with Grader(workers=0) as grader:
        assert grader.grade_many(pairs) == [grade(r, g) for r, g in pairs]


def crash_on_sqrt_666(answer: str, gold: str) -> tuple[bool | None, str]:
    """math-verify, except that answer \\sqrt{666} kills the worker process (runs in the worker)."""
    if answer == "\\sqrt{666}":
        os._exit(1)
    return math_equivalent(answer, gold)


@pytest.fixture(scope="module")
def pool_grader() -> Iterator[Grader]:
    # One pool for the process tests: each worker start imports sympy (about a second).
    with Grader(workers=2, timeout_s=1.0, chunk_size=2, equivalence=crash_on_sqrt_666) as grader:
        yield grader


def test_grader_times_out_a_hanging_item_and_grades_the_rest(pool_grader: Grader) -> None:
    verdicts = pool_grader.grade_many(PAIRS)
    assert [v.correct for v in verdicts] == [True, False, False, True, False, True, False]
    assert verdicts[4].reason == "grader_timeout: no result within 1 s"
    assert verdicts[4].extracted == "9^{9^{9}}"
    assert (verdicts[4].method, verdicts[4].parse_status) == ("grader_error", "not_needed")
    assert [v.reason.split(":")[0] for v in verdicts] == [
        "equivalent",
        "not_equivalent",
        "no_answer",
        "equivalent",
        "grader_timeout",
        "equivalent",
        "not_equivalent",
    ]
    # the restarted worker keeps grading
    after = pool_grader.grade_many([(boxed("\\sqrt{8}"), "2\\sqrt{2}")])
    assert after[0].reason == "equivalent: exact"


def test_grader_survives_a_worker_crash(pool_grader: Grader) -> None:
    pairs = [
        (boxed("\\sqrt{8}"), "2\\sqrt{2}"),
        (boxed("\\sqrt{666}"), "6"),
        (boxed("2x"), "x+x"),
        (boxed("y"), "y^2"),
    ]
    verdicts = pool_grader.grade_many(pairs)
    assert verdicts[1].reason == "grader_crash: worker process died"
    assert verdicts[1].method == "grader_error"
    assert [v.correct for v in verdicts] == [True, False, True, False]
    assert [v.method for v in verdicts] == ["exact", "grader_error", "math_verify", "math_verify"]


def test_grader_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Grader(workers=-1)
    with pytest.raises(ValueError):
        Grader(timeout_s=0)


def raise_on_everything(answer: str, gold: str) -> tuple[bool | None, str]:
    raise ZeroDivisionError


def test_a_crash_in_process_is_a_grader_error() -> None:
    with Grader(workers=0, equivalence=raise_on_everything) as grader:
        [verdict] = grader.grade_many([(boxed("2x"), "x+x")])
    assert verdict == Verdict(
        correct=False,
        extracted="2x",
        reason="grader_error: ZeroDivisionError",
        method="grader_error",
        parse_status="not_needed",
    )


def test_math_equivalent_reports_unparseable_input() -> None:
    answer_failed = (False, "answer did not parse", "math_verify", "answer_failed")
    assert math_equivalent("}{", "1") == answer_failed
    assert math_equivalent("1", "}{") == (False, "gold did not parse", "math_verify", "gold_failed")
    neither = (False, "neither answer nor gold parsed", "math_verify", "neither")
    assert math_equivalent("}{", "}}") == neither


def test_version_names_math_verify() -> None:
    assert GRADER_VERSION.startswith("distillery-grader/3 + math-verify 0.9")


# ------------------------------------------------------------------------------------ JSONL


def test_grade_jsonl_round_trip() -> None:
    rows = [
        {"id": "p1", "answer": "1", "response": boxed("10"), "extra": [1, 2]},
        {"id": "p2", "response": boxed("\\frac{12}{36}"), "answer": "\\frac{1}{3}"},
        {"id": "p3", "answer": "\\sqrt{12}", "response": boxed("2\\sqrt{3}"), "reason": "old"},
    ]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), "   ", json.dumps(rows[2])]
    out = [json.loads(line) for line in grade_jsonl(lines, "data.jsonl", workers=0, batch_size=2)]
    added = ["correct", "extracted", "grade_method", "parse_status"]
    assert [list(row) for row in out] == [
        ["id", "answer", "response", "extra", "correct", "extracted", "reason", *added[2:]],
        ["id", "response", "answer", "correct", "extracted", "reason", *added[2:]],
        ["id", "answer", "response", "reason", *added],
    ]
    assert [row["correct"] for row in out] == [False, True, True]
    assert out[0]["extracted"] == "10" and out[0]["reason"] == "not_equivalent: 10 vs 1"
    assert out[0]["extra"] == [1, 2]
    assert out[2]["reason"] == "equivalent: exact"
    assert [(row["grade_method"], row["parse_status"]) for row in out] == [("exact", "both")] * 3


LINE_3 = "data.jsonl line 3"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "data.jsonl line 3: not valid JSON"),
        ("[1, 2]", "data.jsonl line 3: expected a JSON object, got list"),
        ('{"answer": "1"}', "data.jsonl line 3: missing field 'response'"),
        ('{"response": "x"}', "data.jsonl line 3: missing field 'answer'"),
        ('{"answer": "", "response": "x"}', f"{LINE_3}: field 'answer' must be a non-empty string"),
        ('{"answer": 5, "response": "x"}', f"{LINE_3}: field 'answer' must be a non-empty string"),
        ('{"answer": "5", "response": null}', f"{LINE_3}: field 'response' must be a string"),
    ],
)
def test_grade_jsonl_errors_name_source_line_and_field(line: str, message: str) -> None:
    good = json.dumps({"answer": "1", "response": boxed("1")})
    with pytest.raises(GradeInputError) as caught:
        list(grade_jsonl([good, "", line], "data.jsonl", workers=0))
    assert str(caught.value).startswith(message)
