"""What `report.html` reads back from a run's published datasets, a few columns at a time.

Each figure is a polars query over the dataset's Parquet files (`data/*.parquet`), so a
report of a large run reads the columns it shows, not the rows: token lengths, grade
reasons, the grader audit's disagreements and code errors of graded answers
(`GradedTrajectory` rows: DualDistill's `trajectories/`, a round's `samples/`), and the first
few rows of a dataset as samples.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

EXAMPLES_PER_REASON = 3
AUDIT_ROWS = 25  # disagreements listed (all are counted)
ERROR_ROWS_READ = 500  # answers with a failed code run read for error kinds
ERROR_EXAMPLES = 5


def scan(folder: Path) -> pl.LazyFrame | None:
    """The dataset's rows, lazily; None when the folder holds no data file."""
    files = sorted((Path(folder) / "data").glob("*.parquet"))
    return pl.scan_parquet(files) if files else None


def row_count(folder: Path) -> int | None:
    """Rows of a published dataset, from its manifest (None: no dataset there)."""
    manifest = Path(folder) / "manifest.json"
    return json.loads(manifest.read_text())["num_rows"] if manifest.is_file() else None


def head(folder: Path, n: int, where: pl.Expr | None = None, columns: list[str] | None = None) -> list[dict]:
    """The first `n` rows (in the dataset's order) that match `where`."""
    frame = scan(folder)
    if frame is None or n <= 0:
        return []
    if where is not None:
        frame = frame.filter(where)
    if columns:
        frame = frame.select(columns)
    return frame.head(n).collect().to_dicts()


def values_by(folder: Path, value: str, by: str | pl.Expr) -> dict[str, list[int]]:
    """`value` of every row, grouped by `by` (a column or an expression), groups in first-seen order."""
    frame = scan(folder)
    if frame is None:
        return {}
    key = pl.col(by) if isinstance(by, str) else by
    rows = frame.select(key.cast(pl.String).alias("key"), pl.col(value)).collect()
    grouped: dict[str, list[int]] = {}
    for name, number in rows.iter_rows():
        grouped.setdefault(name, []).append(int(number or 0))
    return grouped


@dataclass
class AnswerFigures:
    """What the report shows of a dataset of graded answers, per group (teacher or student)."""

    wrong_by_reason: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> reason -> answers
    graded_by: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> grade_method -> answers
    reason_examples: list[dict] = field(default_factory=list)  # a few wrong answers per reason
    disagreements: dict[str, int] = field(default_factory=dict)  # group -> answers math-verify grades otherwise
    audit: list[dict] = field(default_factory=list)  # the first AUDIT_ROWS of them
    code: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> runs, failed, answers…
    error_kinds: Counter = field(default_factory=Counter)  # exception name (or last line) -> failed runs
    error_examples: list[dict] = field(default_factory=list)  # failed code with its output
    errors_read: int = 0  # answers with a failed run whose text was read for the above


def answer_figures(folder: Path, group: str = "teacher") -> AnswerFigures:
    figures = AnswerFigures()
    frame = scan(folder)
    if frame is None:
        return figures
    reason = pl.col("grade_reason").str.split(":").list.first().alias("reason")
    key = pl.col(group).cast(pl.String).alias("group")
    wrong = frame.filter(~pl.col("correct"))
    for name, why, count in (wrong.group_by(key, reason, maintain_order=True).len().collect().iter_rows()):
        figures.wrong_by_reason.setdefault(name, {})[why] = count
    for name, method, count in frame.group_by(key, "grade_method", maintain_order=True).len().collect().iter_rows():
        figures.graded_by.setdefault(name, {})[method] = count
    examples = (wrong.with_columns(reason, key)
                .filter(pl.int_range(pl.len()).over("reason") < EXAMPLES_PER_REASON)
                .select("reason", "group", "problem_id", "sample", "extracted", "grade_reason", "finish_reason"))
    figures.reason_examples = examples.collect().to_dicts()

    disagree = pl.col("math_verify_correct").is_not_null() & (pl.col("math_verify_correct") != pl.col("correct"))
    for name, count in frame.filter(disagree).group_by(key, maintain_order=True).len().collect().iter_rows():
        figures.disagreements[name] = count
    figures.audit = (frame.filter(disagree).with_columns(key)
                     .select("group", "problem_id", "sample", "correct", "math_verify_correct", "grade_method",
                             "parse_status", "extracted", "grade_reason")
                     .head(AUDIT_ROWS).collect().to_dicts())

    code = frame.group_by(key, maintain_order=True).agg(
        pl.len().alias("answers"), pl.col("tool_calls").sum().alias("runs"),
        pl.col("tool_errors").sum().alias("failed"), (pl.col("tool_calls") > 0).sum().alias("answers_with_code"),
        (pl.col("tool_errors") > 0).sum().alias("answers_with_failure"),
        (pl.col("finish_reason") == "tool_limit").sum().alias("tool_limit"))
    for row in code.collect().to_dicts():
        figures.code[row.pop("group")] = row
    _read_errors(frame.filter(pl.col("tool_errors") > 0).with_columns(key), figures)
    return figures


def _read_errors(failing: pl.LazyFrame, figures: AnswerFigures) -> None:
    rows = failing.select("group", "problem_id", "sample", "text", "tool_spans").head(ERROR_ROWS_READ).collect()
    figures.errors_read = rows.height
    for row in rows.iter_rows(named=True):
        spans = row["tool_spans"] or []
        for code, output in itertools.pairwise(spans):
            if code["kind"] != "code" or output["kind"] != "executor" or not output["failed"]:
                continue
            shown = row["text"][output["start"]:output["end"]]
            figures.error_kinds[error_kind(shown)] += 1
            if len(figures.error_examples) < ERROR_EXAMPLES:
                figures.error_examples.append({"group": row["group"], "problem_id": row["problem_id"],
                                               "sample": row["sample"], "code": row["text"][code["start"]:code["end"]],
                                               "output": shown})


_EXCEPTION = re.compile(r"\b([A-Z][A-Za-z0-9_]*(?:Error|Exception|Interrupt|Exit|Warning))\b")


def error_kind(output: str) -> str:
    """The exception a failed run ended with (`ZeroDivisionError`), else its last line, shortened."""
    names = _EXCEPTION.findall(output)
    if names:
        return names[-1]
    lines = [line.strip() for line in output.replace("</executor>", "").splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    return last if len(last) <= 60 else last[:57] + "…"


def first_rows_per(folder: Path, column: str, values: Sequence[str], n: int,
                   columns: list[str] | None = None) -> dict[str, list[dict]]:
    """Up to `n` rows for each of `values` of `column`, in the dataset's order (a query each,
    which stops reading once it has them: the long text columns of the others are never read)."""
    return {value: head(folder, n, pl.col(column) == value, columns) for value in values}


def pair_lengths(pairs: list[Path], answers: Path) -> dict[str, dict[str, list[int]]]:
    """Per case, per teacher: completion tokens of the answers in the pairs of that case
    (`composites/` and `rejected/` rows joined to `trajectories/` on the problem id)."""
    frames = [f.select("id", "case") for f in map(scan, pairs) if f is not None]
    graded = scan(answers)
    if not frames or graded is None:
        return {}
    cases = pl.concat(frames)
    joined = cases.join(graded.select(pl.col("problem_id").alias("id"), "teacher", "completion_tokens"), on="id")
    lengths: dict[str, dict[str, list[int]]] = {}
    for case, teacher, tokens in joined.select("case", "teacher", "completion_tokens").collect().iter_rows():
        lengths.setdefault(case, {}).setdefault(teacher, []).append(int(tokens or 0))
    return lengths
