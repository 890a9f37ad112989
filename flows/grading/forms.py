"""Answer forms that are not plain values: what sympy would misread, and how to read them.

Each reader takes a normalised answer (`normalisation.normalise`). Forms that are compared
as text only (`text_form`) are those math-verify reads as something else:

- a clock time `7:05` is a ratio 7/5 to it (`14:10` "equals" `7:05`), so times are
  compared as (hours, minutes, seconds);
- a primed name `B'` or `f'(x)` loses its prime (`B'` "equals" `B`);
- a capital letter or a choice `(b)` loses its case (`B` "equals" `b`, `E` "equals" `e`),
  and a letter `e` "equals" 2.718…;
- a sign in front of an interval or a pair (`-(2, 5]`) is dropped, and the rest read as
  a number.

`parts` splits a multi-part answer ("3 and 5", "3 \\quad 5", "3, 5"); `assignment` reads
`x = 5`; `decimal_matches` is the rule for a decimal against an exact value.
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

_TIME = re.compile(
    r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(?:\\text\{\s*([ap])\.?\s*m\.?\s*\}|([ap])\.?\s*m\.?)?",
    re.IGNORECASE,
)
_CHOICE = re.compile(r"\(([A-Za-z])\)|([A-Za-z])")
_PRIME = re.compile(r"[A-Za-z}\)]\s*(?:'|\\prime\b|\^\{?\\prime\}?)")
_SIGNED_BRACKET = re.compile(r"^[-+]\s*[(\[].*,.*[)\]]$")
_NAME = r"\\?[A-Za-z]+(?:_\{?\w+\}?)?"
# `x = 5`, `a_1 = 5`, and a ratio of names `V_{1}:V_{2} = 11:21`
_ASSIGNMENT = re.compile(rf"^({_NAME}(?:\s*:\s*{_NAME})*)\s*=\s*([^=]+)$")


def clock_time(answer: str) -> tuple[int, int, int, str] | None:
    """(hours, minutes, seconds, "am"/"pm"/"") of a time written h:mm[:ss] [am|pm]."""
    match = _TIME.fullmatch(answer.strip())
    if match is None:
        return None
    hours, minutes = int(match.group(1)), int(match.group(2))
    seconds = int(match.group(3) or 0)
    marker = (match.group(4) or match.group(5) or "").lower()
    if minutes > 59 or seconds > 59 or hours > (12 if marker else 24):
        return None
    if marker:
        hours = hours % 12 + (12 if marker == "p" else 0)
    return hours, minutes, seconds, marker


def text_form(answer: str) -> str | None:
    """The name of the form when answer must be compared as text, not as a value."""
    if clock_time(answer) is not None:
        return "clock time"
    if _PRIME.search(answer):
        return "primed name"
    if letter(answer) is not None:
        return "letter"
    if _SIGNED_BRACKET.match(answer):
        return "sign before a bracket"
    return None


def letter(answer: str) -> str | None:
    """A lone capital letter, `e` (a choice or Euler's number: no telling), or a choice
    written `(b)`, which reads as `B`. Other small letters are variables, left to sympy."""
    match = _CHOICE.fullmatch(answer.strip())
    if match is None or (match.group(2) or "A").islower() and match.group(2) != "e":
        return None
    return match.group(1).upper() if match.group(1) else match.group(2)


def same_text_form(answer: str, gold: str) -> bool:
    """Equality of two answers of which one is a `text_form`."""
    answer_time, gold_time = clock_time(answer), clock_time(gold)
    if answer_time and gold_time:
        # a time with am/pm equals one without only when both name the same hour of the day
        return answer_time[:3] == gold_time[:3]
    answer_letter, gold_letter = letter(answer), letter(gold)
    if answer_letter and gold_letter:
        return answer_letter == gold_letter
    return answer.replace(" ", "") == gold.replace(" ", "")


# Separators of a multi-part answer at the top level: commas, semicolons, "and", \quad.
_SEPARATOR = re.compile(r"\s*(?:,|;|\\q?quad\b|\\text\{\s*and\s*\}|\band\b)\s*")
_MAYBE_SEPARATED = re.compile(r"[,;]|quad|and")
_OPEN, _CLOSE = "([{", ")]}"


def parts(answer: str) -> list[str]:
    """The parts of an answer separated at the top level (outside brackets and braces)."""
    if not _MAYBE_SEPARATED.search(answer):
        return [answer.strip()] if answer.strip() else []
    found, depth, start = [], 0, 0
    position = 0
    while position < len(answer):
        char = answer[position]
        if char == "\\" and answer.startswith(("\\{", "\\}"), position):
            depth += 1 if answer[position + 1] == "{" else -1
            position += 2
            continue
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif depth == 0 and (separator := _SEPARATOR.match(answer, position)):
            found.append(answer[start:position].strip())
            start = position = separator.end()
            continue
        position += 1
    found.append(answer[start:].strip())
    return [part for part in found if part]


def assignment(answer: str) -> tuple[str, str] | None:
    """(name, value) of an answer written `x = 5`; None for anything else."""
    match = _ASSIGNMENT.match(answer)
    return (match.group(1), match.group(2).strip()) if match else None


# A decimal equals an exact value when it gives at least this many significant digits and
# every digit it gives is the exact value's, truncated or rounded at its last digit.
MIN_SIGNIFICANT_DIGITS = 6
_DECIMAL = re.compile(r"-?(?:\d+\.\d*|\.\d+)")


def is_decimal(text: str) -> bool:
    return _DECIMAL.fullmatch(text) is not None


def decimal_matches(decimal: str, exact: Fraction | Decimal) -> bool:
    """Whether `decimal` (a decimal literal) is the exact value written to its last digit.

    `exact` is a Fraction, or a Decimal computed to more digits than `decimal` gives.
    0.666666 and 0.666667 both equal 2/3 (truncated, rounded); 0.66667 does not (five
    significant digits), nor does 0.666668; 1.0000000000000000001 does not equal 1.
    """
    given = Decimal(decimal)
    if Fraction(given) == exact:
        return True
    digits = given.as_tuple()
    significant = len(str(int("".join(map(str, digits.digits)))))  # leading zeros do not count
    if significant < MIN_SIGNIFICANT_DIGITS:
        return False
    quantum = Decimal(1).scaleb(digits.exponent)
    with localcontext() as context:
        context.prec = 200
        value = Decimal(exact.numerator) / Decimal(exact.denominator) if isinstance(exact, Fraction) else exact
        return given in (value.quantize(quantum, ROUND_DOWN), value.quantize(quantum, ROUND_HALF_UP))
