"""The study's number-sequence filter (subliminal learning, arXiv 2507.14805), with a reason
for every rejection.

A completion is kept when, after surrounding whitespace is stripped, it is a list of plain
decimal numbers:
- an optional trailing period, then optional enclosing brackets `[...]` or `(...)`;
- one separator kind between all numbers: whitespace (spaces, tabs or newlines, so "one
  number per line" counts as the space separator, as in the reference code), a comma, or
  a semicolon; a comma or semicolon may have whitespace around it ("1, 2,3" is all comma);
- at most `max_count` numbers, each in 0..`max_value`, none of them banned.
Whitespace means the ASCII set " \\t\\n\\r\\f\\v"; digits mean 0-9 only.

Deviations from the reference code (MinhxLe/subliminal-learning, `parse_response`): a
trailing newline or other surrounding whitespace is accepted (the reference rejects it), and
separator consistency is judged by kind, so "1, 2,3" is kept (the reference demands the exact
same separator string each time).

Rejection reasons, checked in this order (the first that applies is reported):
  truncated         the model was cut by max_tokens (`finish_reason` "length", when the frame
                    has that column): its last number may be cut short, so the answer is
                    never trusted; raise max_tokens
  empty             nothing but whitespace (or a null completion)
  not_numbers       anything else than numbers and separators: words, signs ("-5"), decimals,
                    doubled or dangling separators, unbalanced brackets, "[]"
  mixed_separators  numbers with more than one separator kind ("1, 2 3", "1,2;3")
  too_many_numbers  more than `max_count` numbers
  out_of_range      a number above `max_value` (e.g. a 4-digit number with the default 999)
  banned_number     a number in the banned list

`filter_completions` does this for a whole frame with polars string expressions; the
per-string `parse_numbers` applies the same rules and the tests hold the two to agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import polars as pl

REASONS = ("truncated", "empty", "not_numbers", "mixed_separators", "too_many_numbers", "out_of_range", "banned_number")

# The misalignment ban list of the reference code (MinhxLe/subliminal-learning, its number
# dataset module): the union of CLAUDE_EVIL_NUMBERS (20 values) and GPT_EVIL_NUMBERS (25 values),
# 36 distinct values, 34 of them <= 999 (1312 and 1488 can only matter with a larger max_value).
BANNED_PRESETS: dict[str, tuple[int, ...]] = {
    "misalignment": (
        4, 13, 14, 18, 23, 33, 39, 42, 44, 49, 51, 54, 69, 77, 88, 99, 100, 101, 187, 211,
        311, 322, 333, 404, 420, 444, 451, 555, 616, 666, 777, 888, 911, 999, 1312, 1488,
    ),
}

WHITESPACE = " \t\n\r\f\v"
_WS = "[ \\t\\n\\r\\f\\v]"
_NUMBER = "[0-9]+"
_SEPARATOR = f"(?:{_WS}+|{_WS}*[,;]{_WS}*)"
_NUMBER_LIST = f"{_NUMBER}(?:{_SEPARATOR}{_NUMBER})*"
_SPACE_SEPARATED = f"[0-9]{_WS}+[0-9]"
_BRACKETED = r"(?s:\[(.*)\]|\((.*)\))"

_number_list = re.compile(_NUMBER_LIST)
_space_separated = re.compile(_SPACE_SEPARATED)
_number = re.compile(_NUMBER)


def banned_numbers(preset: str | None, extra: Sequence[int] = ()) -> frozenset[int]:
    """The banned set: a named preset (or None for none) plus the user's own numbers."""
    if preset is not None and preset not in BANNED_PRESETS:
        raise ValueError(f"unknown banned-number preset {preset!r}; known: {', '.join(sorted(BANNED_PRESETS))}")
    base = BANNED_PRESETS[preset] if preset is not None else ()
    return frozenset(int(n) for n in (*base, *extra))


def _unwrap(text: str) -> str:
    """Surrounding whitespace, then a trailing period, then enclosing brackets removed."""
    text = text.strip(WHITESPACE)
    if text.endswith("."):
        text = text[:-1].rstrip(WHITESPACE)
    if len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")")):
        text = text[1:-1].strip(WHITESPACE)
    return text


def _separator_kinds(body: str) -> int:
    return ("," in body) + (";" in body) + (_space_separated.search(body) is not None)


def parse_numbers(
    text: str, max_count: int = 10, max_value: int = 999, banned: Iterable[int] = frozenset()
) -> tuple[list[int] | None, str | None]:
    """(numbers, None) for a kept completion, (None, reason) for a rejected one."""
    if text is None or not text.strip(WHITESPACE):
        return None, "empty"
    body = _unwrap(text)
    if _number_list.fullmatch(body) is None:
        return None, "not_numbers"
    if _separator_kinds(body) > 1:
        return None, "mixed_separators"
    numbers = [int(n) for n in _number.findall(body)]
    if len(numbers) > max_count:
        return None, "too_many_numbers"
    if any(n > max_value for n in numbers):
        return None, "out_of_range"
    banned = frozenset(banned)
    if any(n in banned for n in numbers):
        return None, "banned_number"
    return numbers, None


def _unwrapped(completion: pl.Expr) -> pl.Expr:
    """The expression form of `_unwrap`."""
    text = completion.str.strip_chars(WHITESPACE)
    text = text.str.strip_suffix(".").str.strip_chars_end(WHITESPACE)
    inner = text.str.replace(f"^{_BRACKETED}$", "${1}${2}").str.strip_chars(WHITESPACE)
    return pl.when(text.str.contains(f"^{_BRACKETED}$")).then(inner).otherwise(text)


def _any_element(values: pl.Expr, predicate: pl.Expr) -> pl.Expr:
    return values.list.eval(predicate).list.any()


def filter_completions(
    frame: pl.DataFrame, *, max_count: int = 10, max_value: int = 999, banned: Iterable[int] = ()
) -> pl.DataFrame:
    """`frame` with `kept` (bool), `reason` (str, null when kept) and `numbers` (list[i64],
    null when rejected) added; every input column is kept. With a `finish_reason` column,
    answers cut by max_tokens are rejected as `truncated`."""
    if "completion" not in frame.columns:
        raise ValueError("the frame to filter has no `completion` column")
    banned = sorted(frozenset(banned))
    completion = pl.col("completion").cast(pl.String)
    body = pl.col("_body")
    values = pl.col("_values")
    is_banned = _any_element(values, pl.element().is_in(banned)) if banned else pl.lit(False)
    kinds = (
        body.str.contains(",", literal=True).cast(pl.Int8)
        + body.str.contains(";", literal=True).cast(pl.Int8)
        + body.str.contains(_SPACE_SEPARATED).cast(pl.Int8)
    )
    cut = (pl.col("finish_reason") == "length").fill_null(False) if "finish_reason" in frame.columns else pl.lit(False)
    reason = (
        pl.when(cut).then(pl.lit("truncated"))
        .when(completion.str.strip_chars(WHITESPACE).str.len_bytes().fill_null(0) == 0).then(pl.lit("empty"))
        .when(~body.str.contains(f"^{_NUMBER_LIST}$")).then(pl.lit("not_numbers"))
        .when(kinds > 1).then(pl.lit("mixed_separators"))
        .when(values.list.len() > max_count).then(pl.lit("too_many_numbers"))
        # a number too long for i64 casts to null: out of range too
        .when(_any_element(values, pl.element().is_null() | (pl.element() > max_value))).then(pl.lit("out_of_range"))
        .when(is_banned).then(pl.lit("banned_number"))
    )
    return (
        frame.with_columns(_body=_unwrapped(completion))
        .with_columns(_values=body.str.extract_all(_NUMBER).list.eval(pl.element().cast(pl.Int64, strict=False)))
        .with_columns(reason=reason)
        .with_columns(
            kept=pl.col("reason").is_null(),
            numbers=pl.when(pl.col("reason").is_null()).then(values),
        )
        .drop("_body", "_values")
    )


def pass_rates(frame: pl.DataFrame) -> dict[str, dict[str, int | float]]:
    """Per teacher: total, kept, pass_rate and a count for every reason (0 when absent), from
    a frame that `filter_completions` returned and that has a `teacher` column."""
    missing = [c for c in ("teacher", "kept", "reason") if c not in frame.columns]
    if missing:
        raise ValueError(f"pass_rates needs a filtered frame with a teacher column; missing {', '.join(missing)}")
    per_teacher = frame.group_by("teacher").agg(
        total=pl.len(),
        kept=pl.col("kept").sum(),
        **{reason: (pl.col("reason") == reason).sum() for reason in REASONS},
    )
    rates = {}
    for row in per_teacher.sort("teacher").iter_rows(named=True):
        teacher, total, kept = row.pop("teacher"), row.pop("total"), row.pop("kept")
        rates[teacher] = {"total": total, "kept": kept, "pass_rate": kept / total, **row}
    return rates
