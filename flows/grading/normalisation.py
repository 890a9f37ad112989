"""Normalise answers so equal values compare equal; spot master keys; read exact rationals."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from flows.grading.extraction import _braced
from flows.grading.forms import assignment, clock_time

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
    (re.compile(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))"), ","),  # 2,\!500,\!000
    (re.compile(r"(?<!\\)\\!"), ""),
    # a row break \\ stays whole; \, \: \; and \<space> are spaces; \quad before a unit is a space
    (re.compile(r"(\\\\)|\\[,:; ]|~|\\q?quad(?=\s*\\(?:text|mathrm|mbox)\s*\{)"),
     lambda match: match.group(1) or " "),
    (re.compile(r"\s*\\\\\s*"), r"\\\\"),
    # \quad between two values separates them (3 \quad 5 is the list 3, 5)
    (re.compile(r"(?<=\S)\s*\\q?quad\s*(?=\S)"), ", "),
    (re.compile(r"\s*\\q?quad\s*"), " "),
    (re.compile(r"\\?\$"), ""),
    (re.compile(r"\\?%|\\percent(?![A-Za-z])"), ""),
    (re.compile(r"°"), r"^\\circ"),
    (re.compile(r"\\begin\{(?:bmatrix|matrix)\}"), r"\\begin{pmatrix}"),
    (re.compile(r"\\end\{(?:bmatrix|matrix)\}"), r"\\end{pmatrix}"),
    # [\begin{array}{cc}…\end{array}] is a matrix; an array without brackets may be anything
    (re.compile(r"^[\[(]\s*\\begin\{array\}\s*\{[lcr| ]*\}(.*)\\end\{array\}\s*[\])]$", re.DOTALL),
     r"\\begin{pmatrix}\1\\end{pmatrix}"),
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"(?<!\\)\\\s*$"), ""),  # a stray backslash at the end: `185\`
    (re.compile(r"(?<=\d)\s*\\text\s*\{\s*([ap])\.?\s*m\.?\s*\}", re.IGNORECASE), r" \1m"),  # 7:05 \text{pm}
]
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_NUMBER_IN_DEGREES = re.compile(r"(\d+(?:\.\d+)?)\s*\^\s*\{?\s*\\circ\s*\}?")
_ANGLES_ONLY = re.compile(r"^[-+]?\d+(?:\.\d+)?(?:\s*,\s*[-+]?\d+(?:\.\d+)?)*$")
_MIXED_NUMBER = re.compile(r"^\+?(-?\d+)\s+(\d+)/(\d+)$")
_MIXED_FRAC = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
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
    A degree sign goes when the answer is angles alone ("30^\\circ"); inside an expression
    it becomes π/180 ("\\cos(180^\\circ-\\theta)" is cos(π-θ)). An equation keeps both
    sides: whether `x = 5` may be read as `5` depends on the other side (`compare`).
    """
    text = _ANSWER_PREFIX.sub("", answer.strip())
    for _ in range(3):
        before = text
        text = _unwrap(text)
        for pattern, replacement in _REPLACEMENTS:
            text = pattern.sub(replacement, text)
        text = " ".join(text.split())
        text = _strip_units(text)
        if text == before:
            break
    if (named := assignment(text)) is not None:  # `x = 1,000`: the value normalised as a value
        name, value = named
        return _SPACE_AROUND_SYMBOL.sub(r"\1", name) + "=" + normalise(value)
    if _THOUSANDS.match(text):
        text = text.replace(",", "").replace(" ", "")
    text = _degrees(text)
    if (mixed := _MIXED_NUMBER.match(text)) and int(mixed.group(2)) < int(mixed.group(3)):
        text = f"{mixed.group(1)}\\frac{{{mixed.group(2)}}}{{{mixed.group(3)}}}"  # 2 3/4 is 2\frac{3}{4}
    if clock_time(text) is None:  # 07:05 keeps its minutes' zero
        text = _LEADING_ZEROS.sub("", text)
    text = text.removeprefix("+")
    text = _SPACE_AROUND_SYMBOL.sub(r"\1", text)
    return text.replace(",", ", ")


def _degrees(text: str) -> str:
    if not _DEGREES.search(text):
        return text
    if _ANGLES_ONLY.match(_DEGREES.sub("", text)):
        return _DEGREES.sub("", text)
    return _NUMBER_IN_DEGREES.sub(r"\\frac{\1\\pi}{180}", text)


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
    elif (match := _MIXED_FRAC.fullmatch(text)) and int(match.group(3)) < int(match.group(4)):
        sign, whole, part, denominator = -1 if match.group(1) else 1, *map(int, match.group(2, 3, 4))
        numerator = sign * (whole * denominator + part)  # a mixed number: 2\frac{3}{4} is 11/4
    else:
        return None
    return (Fraction(numerator, denominator), False) if denominator else None
