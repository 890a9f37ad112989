"""What `report.html` reads back from a run's published datasets, a few columns at a time.

Each figure reads only the columns it shows from the dataset's Parquet files (`data/*.parquet`)
with pyarrow, which a run has imported by the time it publishes: token lengths, grade reasons,
the grader audit's disagreements and code errors of graded answers (`GradedTrajectory` rows:
DualDistill's `trajectories/`, a round's `samples/`). Long text (samples, failed code runs) is
read only for the rows shown: the short columns say which rows, then `take` reads just those.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EXAMPLES_PER_REASON = 3
AUDIT_ROWS = 25  # disagreements listed (all are counted)
ERROR_ROWS_READ = 500  # answers with a failed code run read for error kinds
ERROR_EXAMPLES = 5
READ_BATCH = 64  # rows decoded at once where long text is read for a few rows
READ_BUFFER = 1 << 16  # bytes: a column chunk is read a buffer at a time (a page at least), not whole


def _files(folder: Path) -> list[Path]:
    return sorted((Path(folder) / "data").glob("*.parquet"))


def read_columns(folder: Path, columns: list[str]) -> pa.Table | None:
    """`columns` of every row, in the dataset's order; None when the folder holds no data file.
    For short columns (ids, grades, counts); long text is read with `take`."""
    files = _files(folder)
    if not files:
        return None
    return pa.concat_tables(_read(path, columns) for path in files)


def _read(path: Path, columns: list[str]) -> pa.Table:
    # in this thread, without read-ahead: pyarrow's reader threads would each take memory of their own
    # (~10 MB more at the end of a run, for a few MB of columns)
    with pq.ParquetFile(path, pre_buffer=False) as file:
        return file.read(columns, use_threads=False)


def _row_groups(folder: Path) -> Iterator[tuple[pq.ParquetFile, int, int, int]]:
    """(file, row group, the dataset place of its first row, its rows), in the dataset's order."""
    start = 0
    for path in _files(folder):
        with pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False) as file:
            for group in range(file.num_row_groups):
                size = file.metadata.row_group(group).num_rows
                yield file, group, start, size
                start += size


def take(folder: Path, places: Iterable[int], columns: list[str] | None = None) -> list[dict]:
    """The rows at `places` (0 is the dataset's first row), in the dataset's order. Only the row
    groups that hold them are read, `READ_BATCH` rows at a time, and reading stops after the
    last: the long text of other rows is at most passed over, never held."""
    wanted = sorted(set(places))
    rows: list[dict] = []
    for file, group, start, size in _row_groups(folder):
        if len(rows) == len(wanted):
            break
        if wanted[len(rows)] >= start + size:
            continue  # no row wanted in this group: not read
        for batch in file.iter_batches(READ_BATCH, row_groups=[group], columns=columns, use_threads=False):
            end = bisect.bisect_left(wanted, start + batch.num_rows, lo=len(rows))
            if end > len(rows):
                rows += batch.take(_places([place - start for place in wanted[len(rows):end]])).to_pylist()
            start += batch.num_rows
            if len(rows) == len(wanted):
                break
    return rows


def _first(mask: pa.ChunkedArray, n: int) -> list[int]:
    """The places of the first `n` rows where `mask` is true (null counts as false)."""
    return pc.indices_nonzero(mask.fill_null(False))[:n].to_pylist()


def _places(places: Iterable[int]) -> pa.Array:
    return pa.array(places, pa.int64())  # typed: an empty list would be a null array, which `take` refuses


def _numbered(table: pa.Table, name: str) -> pa.Table:
    """`table` with each row's place in it as column `name`."""
    return table.append_column(name, _places(range(table.num_rows)))


def row_count(folder: Path) -> int | None:
    """Rows of a published dataset, from its manifest (None: no dataset there)."""
    manifest = Path(folder) / "manifest.json"
    return json.loads(manifest.read_text())["num_rows"] if manifest.is_file() else None


def head(folder: Path, n: int, where: Mapping[str, Any] | None = None, columns: list[str] | None = None) -> list[dict]:
    """The first `n` rows (in the dataset's order) whose columns equal `where`'s values
    (`{"teacher": "trait", "kept": True}`)."""
    if n <= 0:
        return []
    if not where:
        return take(folder, range(n), columns)
    keys = read_columns(folder, list(where))
    if keys is None:
        return []
    match = functools.reduce(pc.and_kleene, (pc.equal(keys[name], value) for name, value in where.items()))
    return take(folder, _first(match, n), columns)


def values_by(folder: Path, value: str, by: str, label: Callable[[Any], str] | None = None) -> dict[str, list[int]]:
    """`value` of every row, grouped by column `by` (or by `label` of it), groups in first-seen order."""
    rows = read_columns(folder, [by, value])
    if rows is None:
        return {}
    keys = rows[by].to_pylist() if label else rows[by].cast(pa.string()).to_pylist()
    grouped: dict[str, list[int]] = {}
    for key, number in zip(keys, rows[value].to_pylist()):
        grouped.setdefault(label(key) if label else key, []).append(int(number or 0))
    return grouped


def _counts(table: pa.Table, keys: list[str]) -> list[tuple]:
    """(the keys' values…, rows) of each group of `table`, groups in first-seen order."""
    counted = table.group_by(keys, use_threads=False).aggregate([(keys[0], "count", pc.CountOptions("all"))])
    return list(zip(*(counted[key].to_pylist() for key in keys), counted[f"{keys[0]}_count"].to_pylist()))


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


_GRADES = ["problem_id", "sample", "correct", "math_verify_correct", "grade_method", "parse_status", "extracted",
           "grade_reason", "finish_reason", "tool_calls", "tool_errors"]  # every short column the figures use
_CODE_SUMS = ["runs", "failed", "answers_with_code", "answers_with_failure", "tool_limit"]


def answer_figures(folder: Path, group: str = "teacher") -> AnswerFigures:
    figures = AnswerFigures()
    rows = read_columns(folder, [group, *_GRADES])
    if rows is None:
        return figures
    rows = rows.set_column(rows.column_names.index(group), "group", rows[group].cast(pa.string()))
    rows = rows.append_column("reason", pc.list_element(pc.split_pattern(rows["grade_reason"], ":"), 0))
    wrong = rows.filter(pc.invert(rows["correct"]))
    for name, why, count in _counts(wrong, ["group", "reason"]):
        figures.wrong_by_reason.setdefault(name, {})[why] = count
    for name, method, count in _counts(rows, ["group", "grade_method"]):
        figures.graded_by.setdefault(name, {})[method] = count
    figures.reason_examples = _first_per(wrong, "reason", EXAMPLES_PER_REASON).select(
        ["reason", "group", "problem_id", "sample", "extracted", "grade_reason", "finish_reason"]).to_pylist()

    verified = rows["math_verify_correct"]
    disagree = rows.filter(pc.and_kleene(pc.is_valid(verified), pc.not_equal(verified, rows["correct"])))
    figures.disagreements = dict(_counts(disagree, ["group"]))
    figures.audit = disagree.slice(0, AUDIT_ROWS).select(
        ["group", "problem_id", "sample", "correct", "math_verify_correct", "grade_method", "parse_status",
         "extracted", "grade_reason"]).to_pylist()

    calls, errors = rows["tool_calls"], rows["tool_errors"]
    per_answer = pa.table({"group": rows["group"], "runs": calls, "failed": errors,
                           "answers_with_code": pc.greater(calls, 0), "answers_with_failure": pc.greater(errors, 0),
                           "tool_limit": pc.equal(rows["finish_reason"], "tool_limit")})
    code = per_answer.group_by("group", use_threads=False).aggregate(
        [("group", "count", pc.CountOptions("all"))]
        + [(name, "sum", pc.ScalarAggregateOptions(min_count=0)) for name in _CODE_SUMS])
    for row in code.to_pylist():
        figures.code[row["group"]] = {"answers": row["group_count"],
                                      **{name: row[f"{name}_sum"] for name in _CODE_SUMS}}
    _read_errors(folder, rows, figures)
    return figures


def _first_per(table: pa.Table, column: str, n: int) -> pa.Table:
    """The first `n` rows of each value of `column`, in the table's order."""
    seen: Counter = Counter()
    keep = []
    for place, value in enumerate(table[column].to_pylist()):
        seen[value] += 1
        if seen[value] <= n:
            keep.append(place)
    return table.take(_places(keep))


def _read_errors(folder: Path, rows: pa.Table, figures: AnswerFigures) -> None:
    """Error kinds and examples from the first ERROR_ROWS_READ answers with a failed run (their text only)."""
    failing = _first(pc.greater(rows["tool_errors"], 0), ERROR_ROWS_READ)
    figures.errors_read = len(failing)
    answers = rows.take(_places(failing)).select(["group", "problem_id", "sample"]).to_pylist()
    for row, read in zip(answers, take(folder, failing, ["text", "tool_spans"])):
        spans = read["tool_spans"] or []
        for code, output in itertools.pairwise(spans):
            if code["kind"] != "code" or output["kind"] != "executor" or not output["failed"]:
                continue
            shown = read["text"][output["start"]:output["end"]]
            figures.error_kinds[error_kind(shown)] += 1
            if len(figures.error_examples) < ERROR_EXAMPLES:
                figures.error_examples.append({**row, "code": read["text"][code["start"]:code["end"]],
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
    """Up to `n` rows for each of `values` of `column`, in the dataset's order (`column` is read
    whole, then only those rows: the long text columns of the others are never held)."""
    keys = read_columns(folder, [column])
    if keys is None:
        return {value: [] for value in values}
    places = {value: _first(pc.equal(keys[column], value), n) for value in values}
    wanted = sorted({place for found in places.values() for place in found})
    rows = dict(zip(wanted, take(folder, wanted, columns)))
    return {value: [rows[place] for place in found] for value, found in places.items()}


def pair_lengths(pairs: list[Path], answers: Path) -> dict[str, dict[str, list[int]]]:
    """Per case, per teacher: completion tokens of the answers in the pairs of that case
    (`composites/` and `rejected/` rows joined to `trajectories/` on the problem id, in the
    pairs' order, then the answers')."""
    tables = [table for table in (read_columns(folder, ["id", "case"]) for folder in pairs) if table is not None]
    graded = read_columns(answers, ["problem_id", "teacher", "completion_tokens"])
    if not tables or graded is None:
        return {}
    cases = _numbered(pa.concat_tables(tables), "pair")
    graded = _numbered(graded.rename_columns({"problem_id": "id"}), "answer")
    joined = cases.join(graded, "id", join_type="inner", use_threads=False)
    joined = joined.sort_by([("pair", "ascending"), ("answer", "ascending")])  # a join keeps no order
    lengths: dict[str, dict[str, list[int]]] = {}
    columns = (joined[name].to_pylist() for name in ("case", "teacher", "completion_tokens"))
    for case, teacher, tokens in zip(*columns):
        lengths.setdefault(case, {}).setdefault(teacher, []).append(int(tokens or 0))
    return lengths
