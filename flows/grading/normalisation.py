"""Normalise answers so equal values compare equal; spot master keys; read exact rationals."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from flows.grading.extraction import _braced

_MASTER_KEY = re.compile(
    r"""^(?:
        let['’]?s\b.* | let\s+us\b.*                   # "Let's solve this step by step."
      | (?:the\s+)?(?:final\s+)?(?:solution|answer)(?:\s+is)?
      | step(?:\s*\d+)? | i\s+think | thinking | thought | reasoning | analysis
      | okay | ok | hmm+ | well | first(?:ly)? | sure
    )[\s.:;,!?]*$""",
    re.IGNORECASE | re.VERBOSE,
)
_PUNCTUATION_ONLY = re.compile(r"""^[\s.:;,!?\-–—*#'"`()\[\]{}]*$""")
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence),?\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*",
    re.IGNORECASE,
)
_OUTER_MATH = [
    re.compile(pattern, re.DOTALL)
    for pattern in (r"^\$\$(.*)\$\$$", r"^\$(.*)\$$", r"^\\\((.*)\\\)$", r"^\\\[(.*)\\\]$")
]
_WHOLE_GROUP = re.compile(r"^\\(boxed|fbox|text|textrm|textbf|mbox|mathrm|mathbf)\s*(?=\{)")
_REPLACEMENTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),  # \frac12
    (re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])\s*"), ""),
    (re.compile(r"\\(?:displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\!"), ""),
    (re.compile(r"\\[,:; ]|\\quad|\\qquad|~"), " "),
    (re.compile(r"\\?\$"), ""),
    (re.compile(r"\\?%|\\percent(?![A-Za-z])"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"[−–]"), "-"),
]
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=\S)\s*\\(?:(?:text|textrm|mbox)\s*\{\s*[A-Za-z][A-Za-z\s.]*"
    r"|mathrm\s*\{\s*[A-Za-z]{2,}[A-Za-z\s.]*)\}"  # \mathrm{i} is the imaginary unit
    r"\s*(?:\^\s*\{?\d\}?)?$"
)
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\d+/\d+|\\frac\{\d+\}\{\d+\})"
_MATH_WORDS = r"(?:pi|sqrt|inf|infinity|ln|log|exp|sin|cos|tan|mod|and|or|to|times|over)\b"
_TRAILING_UNIT_WORDS = re.compile(
    rf"^({_NUMBER})\s+(?!{_MATH_WORDS})(?:[A-Za-z]{{2,}}\b\.?\s*){{1,3}}(?:\^\s*\{{?\d\}}?)?$"
)
_ASSIGNMENT = re.compile(r"^\\?[A-Za-z]+(?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_LEADING_ZEROS = re.compile(r"(?<![\w.])0+(?=\d)")
_SPACE_AROUND_SYMBOL = re.compile(r"\s*([=+\-*/^_{}()\[\],<>|])\s*")


def master_key(answer: str) -> str | None:
    """Why answer is an empty opener rather than a value, or None when it is not one."""
    stripped = answer.strip()
    if stripped and _PUNCTUATION_ONLY.match(stripped):
        return f"punctuation only {stripped[:20]!r}"
    if _MASTER_KEY.match(stripped):
        return f"opener {stripped[:40]!r}"
    return None


@lru_cache(maxsize=65536)
def normalise(answer: str) -> str:
    """A canonical string for an answer, so that equal values usually compare equal.

    Thousands separators go only when every group has three digits and no space
    follows the comma ("12,345" -> "12345"); other commas separate list items and are
    written ", " ("1,2" and "1, 2" -> "1, 2"; "12, 345" stays a two-item list).
    """
    text = _ANSWER_PREFIX.sub("", answer.strip())
    for _ in range(3):
        before = text
        text = _unwrap(text)
        for pattern, replacement in _REPLACEMENTS:
            text = pattern.sub(replacement, text)
        text = " ".join(text.split())
        text = _strip_units(text)
        if match := _ASSIGNMENT.match(text):
            text = match.group(1).strip()
        if text == before:
            break
    if _THOUSANDS.match(text):
        text = text.replace(",", "").replace(" ", "")
    text = _LEADING_ZEROS.sub("", text).removeprefix("+")
    text = _SPACE_AROUND_SYMBOL.sub(r"\1", text)
    return text.replace(",", ", ")


def _unwrap(text: str) -> str:
    """Remove what wraps the whole answer: $…$, \\(…\\), \\boxed{…}, \\text{…}, a period."""
    while True:
        before = text
        text = text.strip()
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        for pattern in _OUTER_MATH:
            if match := pattern.match(text):
                text = match.group(1).strip()
        if match := _WHOLE_GROUP.match(text):
            inner = _braced(text, match.end())
            if inner is not None and match.end() + len(inner) + 2 == len(text):
                text = inner.strip()
        if text == before:
            return text


def _strip_units(text: str) -> str:
    """Drop a trailing unit: `5 \\text{ cm}`, `5 \\mathrm{kg}`, `12 square feet`, `3 cm^2`."""
    if any(ch.isdigit() for ch in text):
        text = _TRAILING_TEXT_UNIT.sub("", text)
    if match := _TRAILING_UNIT_WORDS.match(text):
        text = match.group(1)
    return text


_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?(?:\d+\.\d*|\.\d+)")
_SLASH = re.compile(r"(-?\d+)/(\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_MAX_EXACT_DIGITS = 1000  # int() refuses very long strings; those go to math-verify


def as_rational(text: str) -> tuple[Fraction, bool] | None:
    """An integer, decimal or simple fraction as an exact value, and whether it is a decimal."""
    if len(text) > _MAX_EXACT_DIGITS:
        return None
    if _INTEGER.fullmatch(text):
        return Fraction(int(text)), False
    if _DECIMAL.fullmatch(text):
        return Fraction(text), True
    if match := _SLASH.fullmatch(text):
        numerator, denominator = int(match.group(1)), int(match.group(2))
    elif match := _FRAC.fullmatch(text):
        sign = -1 if match.group(1) else 1
        numerator, denominator = sign * int(match.group(2)), int(match.group(3))
    else:
        return None
    return (Fraction(numerator, denominator), False) if denominator else None
