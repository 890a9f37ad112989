"""Grade JSON lines (`distillery grade FILE.jsonl`); a bad row raises `GradeInputError`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flows.grading.grader import Grader


class GradeInputError(ValueError):
    """A grading input row that cannot be graded; the message names source, line, field."""


def grade_jsonl(
    lines: Iterable[str], source: str = "<stdin>", *, workers: int = 1, batch_size: int = 4096
) -> Iterator[str]:
    """Grade JSON lines holding `answer` (gold) and `response`; yield them with
    `correct`, `extracted`, `reason`, `grade_method` and `parse_status` added (see
    `Verdict`), every other key kept in its order.

    Blank lines are skipped. A bad line raises GradeInputError naming the source, the
    1-based line number and the field; lines of earlier batches have been yielded by then.
    """
    with Grader(workers=workers) as grader:
        batch: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            batch.append(_read_row(line, source, number))
            if len(batch) >= batch_size:
                yield from _graded_lines(grader, batch)
                batch = []
        if batch:
            yield from _graded_lines(grader, batch)


def _read_row(line: str, source: str, number: int) -> dict[str, Any]:
    where = f"{source} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise GradeInputError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise GradeInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("answer", "response"):
        if field not in row:
            raise GradeInputError(f"{where}: missing field {field!r}")
    if not isinstance(row["answer"], str) or not row["answer"].strip():
        raise GradeInputError(f"{where}: field 'answer' must be a non-empty string")
    if not isinstance(row["response"], str):
        raise GradeInputError(f"{where}: field 'response' must be a string")
    return row


def _graded_lines(grader: Grader, rows: list[dict[str, Any]]) -> Iterator[str]:
    verdicts = grader.grade_many([(row["response"], row["answer"]) for row in rows])
    for row, verdict in zip(rows, verdicts, strict=True):
        row.update(
            correct=verdict.correct,
            extracted=verdict.extracted,
            reason=verdict.reason,
            grade_method=verdict.method,
            parse_status=verdict.parse_status,
        )
        yield json.dumps(row, ensure_ascii=False)
