"""Compare an extracted answer with the gold: cheap rules first (`_prepare`), math-verify
for the rest (`math_equivalent`), then the verdict (`_conclude`); `grade` does all three."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from typing import Any

from flows.grading.extraction import extract_final_answer
from flows.grading.normalisation import as_rational, master_key, normalise
from schemas.records import Verdict

GRADER_VERSION = f"distillery-grader/1 + math-verify {version('math-verify')}"

# (equivalent or None when no result came back, note or reason)
Outcome = tuple[bool | None, str]
Equivalence = Callable[[str, str], Outcome]
Key = tuple[str, str]  # (normalised answer, normalised gold)


@dataclass(frozen=True)
class _Check:
    """A comparison the cheap rules could not settle; math-verify decides it."""

    extracted: str
    answer: str  # normalised
    gold: str  # normalised

    @property
    def key(self) -> Key:
        return self.answer, self.gold


def _wrong(extracted: str | None, reason: str) -> Verdict:
    return Verdict(correct=False, extracted=extracted, reason=reason)


def _right(extracted: str, reason: str) -> Verdict:
    return Verdict(correct=True, extracted=extracted, reason=reason)


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
        return _right(extracted, "equal_after_normalisation")
    exact_answer, exact_gold = as_rational(answer), as_rational(expected)
    if exact_answer and exact_gold:
        if exact_answer[0] == exact_gold[0]:
            return _right(extracted, "equivalent: exact_rational")
        # With a decimal on either side math-verify's rounding rule decides (1/3 ~ 0.333333).
        if not (exact_answer[1] or exact_gold[1]):
            return _wrong(extracted, f"not_equivalent: {_short(answer)} vs {_short(expected)}")
    if max(len(answer), len(expected)) > _MAX_SYMBOLIC_CHARS:
        detail = f"{_short(answer)} vs {_short(expected)} (too long to compare symbolically)"
        return _wrong(extracted, f"not_equivalent: {detail}")
    return _Check(extracted, answer, expected)


def _conclude(check: _Check, outcome: Outcome) -> Verdict:
    equivalent, note = outcome
    if equivalent is None:
        return _wrong(check.extracted, note)
    if equivalent:
        return _right(check.extracted, "equivalent: math_verify")
    detail = f"{_short(check.answer)} vs {_short(check.gold)}"
    return _wrong(check.extracted, f"not_equivalent: {detail}" + (f" ({note})" if note else ""))


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


@lru_cache(maxsize=65536)
def math_equivalent(answer: str, gold: str) -> Outcome:
    """math-verify's judgement on two normalised answers, with its own timeouts off."""
    from math_verify import verify

    expected, given = _parsed(gold), _parsed(answer)
    if not expected:
        return False, "gold did not parse"
    if not given:
        return False, "answer did not parse"
    return verify(list(expected), list(given), timeout_seconds=None), ""


def _run_equivalence(equivalence: Equivalence, answer: str, gold: str) -> Outcome:
    try:
        return equivalence(answer, gold)
    except Exception as error:  # a crash in sympy is a wrong answer, not a stopped run
        return False, f"error: {type(error).__name__}"


def grade(response: str, gold: str) -> Verdict:
    """Grade one response in this thread. Safe in any thread; not bounded in time."""
    staged = _prepare(response, gold)
    if isinstance(staged, Verdict):
        return staged
    return _conclude(staged, _run_equivalence(math_equivalent, staged.answer, staged.gold))

