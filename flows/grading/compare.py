"""Compare an extracted answer with the gold: cheap rules first (`_prepare`), sympy for
the rest (`math_equivalent`: exact arithmetic, else math-verify), then the verdict
(`_conclude`); `grade` does all three."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from typing import Any, NamedTuple

from flows.grading.extraction import extract_final_answer
from flows.grading.normalisation import as_rational, master_key, normalise
from schemas.records import GradeMethod, ParseStatus, Verdict

GRADER_VERSION = f"distillery-grader/2 + math-verify {version('math-verify')}"


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
    if answer == expected:
        return _right(extracted, "equal_after_normalisation", "normalised_string")
    exact_answer, exact_gold = as_rational(answer), as_rational(expected)
    if exact_answer and exact_gold:
        if exact_answer[0] == exact_gold[0]:
            return _right(extracted, "equivalent: exact_rational", "exact", parse_status="both")
        # With a decimal on either side math-verify's rounding rule decides (1/3 ~ 0.333333).
        if not (exact_answer[1] or exact_gold[1]):
            detail = f"{_short(answer)} vs {_short(expected)}"
            return _wrong(extracted, f"not_equivalent: {detail}", "exact", parse_status="both")
    if max(len(answer), len(expected)) > _MAX_SYMBOLIC_CHARS:
        detail = f"{_short(answer)} vs {_short(expected)} (too long to compare symbolically)"
        return _wrong(extracted, f"not_equivalent: {detail}")
    return _Check(extracted, answer, expected)


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
        exact = compare_exact(gold_value, answer_value)
        if exact is not None:
            return Outcome(exact, "", "exact", parse_status)
    # math-verify also compares the strings it extracted when it read no value
    equivalent = verify(list(expected), list(given), timeout_seconds=None)
    return Outcome(equivalent, "", "math_verify", parse_status)


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

