"""Compare an extracted answer with the gold: cheap rules first (`_prepare`), sympy for
the rest (`math_equivalent`: exact arithmetic, else math-verify), then the verdict
(`_conclude`); `grade` does all three."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib.metadata import version
from typing import Any, NamedTuple

from flows.grading.extraction import boxed_answers, extract_final_answer, visible_text
from flows.grading.forms import (
    MIN_SIGNIFICANT_DIGITS,
    assignment,
    decimal_matches,
    is_decimal,
    parts,
    same_text_form,
    text_form,
)
from flows.grading.normalisation import as_rational, master_key, normalise
from flows.grading.refusal import empty_reason
from schemas.records import GradeMethod, ParseStatus, Verdict

GRADER_VERSION = f"distillery-grader/3 + math-verify {version('math-verify')}"


class Outcome(NamedTuple):
    """What a comparison in a worker found."""

    equivalent: bool | None  # None: no result came back
    note: str  # the reason when equivalent is None, else a detail for the verdict
    method: GradeMethod = "math_verify"
    parse_status: ParseStatus = "both"


# Returns an Outcome, or a plain (equivalent, note) pair (tests inject such functions).
Equivalence = Callable[[str, str], tuple[Any, ...]]
Key = tuple[str, str]  # (normalised answer, normalised gold)


@dataclass(frozen=True)
class _Check:
    """A comparison the cheap rules could not settle; sympy decides it."""

    extracted: str
    answer: str  # normalised
    gold: str  # normalised

    @property
    def key(self) -> Key:
        return self.answer, self.gold


def _wrong(extracted: str | None, reason: str, method: GradeMethod = "rule", **kw: Any) -> Verdict:
    return Verdict(correct=False, extracted=extracted, reason=reason, method=method, **kw)


def _right(extracted: str, reason: str, method: GradeMethod, **kw: Any) -> Verdict:
    return Verdict(correct=True, extracted=extracted, reason=reason, method=method, **kw)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# sympy's time grows quickly with length; a value longer than this is prose, not an answer.
_MAX_SYMBOLIC_CHARS = 500


def _prepare(response: str, gold: str) -> Verdict | _Check:
    """Everything short of sympy: extraction, rejections, normalised and exact comparison."""
    if empty := empty_reason(response):  # empty, blank, or a refusal with no answer
        return _wrong(None, empty)
    extracted, how = extract_final_answer(response)
    if extracted is None:
        return _wrong(None, how)
    if not extracted.strip():
        return _wrong(extracted, "empty_answer")
    if opener := master_key(extracted):
        return _wrong(extracted, f"master_key: {opener}")
    answer = normalise(extracted)
    if not answer:
        return _wrong(extracted, "empty_answer: nothing left after normalisation")
    if opener := master_key(answer):
        return _wrong(extracted, f"master_key: {opener}")
    expected = normalise(gold)
    if not expected:
        return _wrong(extracted, "invalid_gold: empty after normalisation")
    if how in _FROM_BOXES and len(_BOX_OPENINGS.findall(response)) > 1:
        several = _several_boxes(response, expected)
        if isinstance(several, Verdict):
            return several
        if several is not None:
            extracted, answer = several
    answer, expected = _joined(answer), _joined(expected)
    answer, expected = _values_of_assignments(answer, expected)
    if answer == expected:
        return _right(extracted, "equal_after_normalisation", "normalised_string")
    if form := text_form(answer) or text_form(expected):
        if same_text_form(answer, expected):
            return _right(extracted, f"equal_as_text: {form}", "normalised_string")
        detail = f"{_short(answer)} vs {_short(expected)} (compared as text: {form})"
        return _wrong(extracted, f"not_equivalent: {detail}")
    if (decided := _as_rationals(extracted, answer, expected, gold)) is not None:
        return decided
    if max(len(answer), len(expected)) > _MAX_SYMBOLIC_CHARS:
        detail = f"{_short(answer)} vs {_short(expected)} (too long to compare symbolically)"
        return _wrong(extracted, f"not_equivalent: {detail}")
    return _Check(extracted, answer, expected)


_FROM_BOXES = {"answer_tag_boxed", "boxed_outside_reasoning"}
_PERCENT = re.compile(r"%|\\percent(?![A-Za-z])")
_SET = re.compile(r"\\?\{(.*)\\?\}")
_BOX_OPENINGS = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_DECIMAL_RULE = f"a decimal equals an exact value to its last digit, given {MIN_SIGNIFICANT_DIGITS}+ significant digits"


def _several_boxes(response: str, expected: str) -> Verdict | tuple[str, str] | None:
    """Several boxed values where the answer is read: (extracted, normalised answer) joined
    when the gold has as many parts (or is a set of as many members), a `hedge` otherwise;
    None when the boxes hold one value."""
    boxes = boxed_answers(response)
    values = list(dict.fromkeys(normalise(box) for box in boxes))
    if len(values) < 2:
        return None
    wanted, members = len(parts(expected)), _SET.fullmatch(expected)
    if members and len(parts(members.group(1))) == len(values):  # a set's members, boxed one by one
        return ", ".join(boxes), "\\{" + ", ".join(values) + "\\}"
    if len(values) == wanted:
        return ", ".join(boxes), ", ".join(values)
    return _wrong(", ".join(boxes), f"hedge: {len(values)} different boxed answers "
                  f"({_short(' | '.join(values))}) for a gold of {wanted} part(s)")


def _as_rationals(extracted: str, answer: str, expected: str, gold: str) -> Verdict | None:
    """The verdict when both sides are integers, decimals or simple fractions; else None."""
    exact_answer, exact_gold = as_rational(answer), as_rational(expected)
    if not (exact_answer and exact_gold):
        return None
    (answer_value, answer_decimal), (gold_value, gold_decimal) = exact_answer, exact_gold
    if answer_value == gold_value:
        return _right(extracted, "equivalent: exact_rational", "exact", parse_status="both")
    if _PERCENT.search(extracted) and not _PERCENT.search(gold) and answer_value / 100 == gold_value:
        return _right(extracted, "equivalent: exact_rational (a percentage of the gold's value)", "exact",
                      parse_status="both")  # 28% for a gold of 7/25; 28% for 28 is equal above
    detail = f"{_short(answer)} vs {_short(expected)}"
    if answer_decimal != gold_decimal:  # a decimal against an exact value: the digits rule
        decimal, exact = (answer, gold_value) if answer_decimal else (expected, answer_value)
        if decimal_matches(decimal, exact):
            return _right(extracted, f"equivalent: {_DECIMAL_RULE}", "decimal", parse_status="both")
        return _wrong(extracted, f"not_equivalent: {detail} ({_DECIMAL_RULE})", "decimal", parse_status="both")
    return _wrong(extracted, f"not_equivalent: {detail}", "exact", parse_status="both")


def _joined(answer: str) -> str:
    """A multi-part answer written with "and", ";" or \\quad, written with commas."""
    found = parts(answer)
    return ", ".join(found) if len(found) > 1 else answer


def _values_of_assignments(answer: str, gold: str) -> tuple[str, str]:
    """`x = 5` read as `5` when the other side is a value, kept whole when it is an
    equation too: `x = 2` and `y = 2` are different answers, `3x-6y=12` and `y=x/2-2` one line."""
    answer_assigns, gold_assigns = assignment(answer), assignment(gold)
    if answer_assigns and "=" not in gold:
        return normalise(answer_assigns[1]), gold
    if gold_assigns and "=" not in answer:
        return answer, normalise(gold_assigns[1])
    return answer, gold


def _conclude(check: _Check, outcome: Outcome) -> Verdict:
    equivalent, note, method, parse_status = outcome
    if equivalent is None:
        return _wrong(check.extracted, note, "grader_error", parse_status=parse_status)
    if equivalent:
        return _right(check.extracted, f"equivalent: {method}", method, parse_status=parse_status)
    detail = f"{_short(check.answer)} vs {_short(check.gold)}" + (f" ({note})" if note else "")
    return _wrong(check.extracted, f"not_equivalent: {detail}", method, parse_status=parse_status)


class _QuietTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeouts are off; time is bounded by Grader instead.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeoutWarning())


@lru_cache(maxsize=65536)
def _parsed(latex: str) -> tuple[Any, ...]:
    from math_verify import parse

    # Bare LaTeX parses to nothing; a \boxed{} makes math-verify read the whole string.
    return tuple(parse(f"\\boxed{{{latex}}}", parsing_timeout=None))


_PARSE_STATUS: dict[tuple[bool, bool], ParseStatus] = {
    (True, True): "both",
    (False, True): "answer_failed",
    (True, False): "gold_failed",
    (False, False): "neither",
}
_UNPARSED_NOTE = {
    "answer_failed": "answer did not parse",
    "gold_failed": "gold did not parse",
    "neither": "neither answer nor gold parsed",
}


def _value(parsed: tuple[Any, ...]) -> Any:
    # math-verify returns [sympy value, its string], or only the string when it read no value
    return next((item for item in parsed if not isinstance(item, str)), None)


@lru_cache(maxsize=65536)
def math_equivalent(answer: str, gold: str) -> Outcome:
    """Two normalised answers compared: exactly when both are exact numbers (or tuples,
    intervals, sets of them), else by math-verify with its own timeouts off."""
    from math_verify import verify

    from flows.grading.exact import compare_exact  # imports sympy: not at package import

    given, expected = _parsed(answer), _parsed(gold)
    answer_value, gold_value = _value(given), _value(expected)
    parse_status = _PARSE_STATUS[answer_value is not None, gold_value is not None]
    if not (given and expected):
        return Outcome(False, _UNPARSED_NOTE[parse_status], "math_verify", parse_status)
    if parse_status == "both":
        answer_value, gold_value = _with_imaginary_unit(answer_value, gold_value)
        decided = _decimal_against_exact(answer, gold, answer_value, gold_value)
        if decided is not None:
            return Outcome(decided, "" if decided else _DECIMAL_RULE, "decimal", parse_status)
        exact = compare_exact(gold_value, answer_value)
        if exact is not None:
            return Outcome(exact, "", "exact", parse_status)
        given, expected = (answer_value, *given[1:]), (gold_value, *expected[1:])
    # math-verify also compares the strings it extracted when it read no value
    equivalent = verify(list(expected), list(given), timeout_seconds=None)
    return Outcome(equivalent, "", "math_verify", parse_status)


def _with_imaginary_unit(answer: Any, gold: Any) -> tuple[Any, Any]:
    """`i` read as the imaginary unit on both sides when either has it: (1+i)^2 = 2i."""
    from sympy import I

    units = {symbol for value in (answer, gold) for symbol in getattr(value, "free_symbols", ())
             if symbol.name == "i"}  # math-verify's symbols carry assumptions: match by name
    if not units:
        return answer, gold
    return tuple(value.subs({unit: I for unit in units}) if hasattr(value, "subs") else value
                 for value in (answer, gold))


def _decimal_against_exact(answer: str, gold: str, answer_value: Any, gold_value: Any) -> bool | None:
    """The digits rule (`forms.decimal_matches`) when one side is a decimal literal and the
    other an exact real number; None otherwise."""
    from decimal import Decimal

    from flows.grading.exact import exact_value

    if is_decimal(answer) == is_decimal(gold):
        return None
    decimal, other = (answer, gold_value) if is_decimal(answer) else (gold, answer_value)
    exact = exact_value(other) if hasattr(other, "free_symbols") else None
    if exact is None or not exact.is_real:
        return None
    if exact.is_Rational:
        return decimal_matches(decimal, Fraction(int(exact.p), int(exact.q)))
    return decimal_matches(decimal, Decimal(str(exact.evalf(len(decimal) + 40))))


def math_verify_alone(response: str, gold: str) -> Outcome:
    """math-verify as its own README grades — the gold read in a `\\boxed{}`, the answer text
    parsed as it comes — on the text a grader may read: outside <think>, <code> and
    <executor> (a value only in reasoning or program output is no answer, for either grader;
    and parsing whole reasoning traces would cost ~2 ms an answer). Our extraction of the
    final answer, our rules and our exact arithmetic play no part. The second opinion of
    `distillery grade --audit` and of every run's `math_verify_correct`."""
    from math_verify import parse, verify

    visible, _ = visible_text(response)
    expected = _parsed(gold)  # the same gold for every sample of a problem: parsed once
    given = parse(visible, parsing_timeout=None)
    status = _PARSE_STATUS[_value(tuple(given)) is not None, _value(tuple(expected)) is not None]
    if not (given and expected):
        return Outcome(False, _UNPARSED_NOTE[status], "math_verify", status)
    return Outcome(bool(verify(list(expected), given, timeout_seconds=None)), "", "math_verify", status)


def _run_equivalence(equivalence: Equivalence, answer: str, gold: str) -> Outcome:
    try:
        return Outcome(*equivalence(answer, gold))
    except Exception as error:  # a crash in sympy is a wrong answer, not a stopped run
        return Outcome(None, f"grader_error: {type(error).__name__}", "grader_error", "not_needed")


def grade(response: str, gold: str) -> Verdict:
    """Grade one response in this thread. Safe in any thread; not bounded in time."""
    staged = _prepare(response, gold)
    if isinstance(staged, Verdict):
        return staged
    return _conclude(staged, _run_equivalence(math_equivalent, staged.answer, staged.gold))

