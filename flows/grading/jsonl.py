"""Grade JSON lines (`distillery grade FILE.jsonl`) or audit them against math-verify alone
(`distillery grade --audit`); a bad row raises `GradeInputError`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    for name in ("answer", "response"):
        if name not in row:
            raise GradeInputError(f"{where}: missing field {name!r}")
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


@dataclass
class Disagreement:
    """A line that our grader and math-verify alone grade differently."""

    line: int
    gold: str
    extracted: str | None
    ours: bool
    math_verify: bool
    reason: str


@dataclass
class Audit:
    """`distillery grade --audit`: where our grader and math-verify alone part, by our reason."""

    source: str
    graded: int = 0
    unanswered: int = 0  # math-verify timed out or crashed
    by_reason: dict[str, list[Disagreement]] = field(default_factory=dict)

    @property
    def disagreements(self) -> int:
        return sum(map(len, self.by_reason.values()))


def audit_jsonl(
    lines: Iterable[str], source: str = "<stdin>", *, workers: int = 1, batch_size: int = 4096
) -> Audit:
    """Grade every line as `grade_jsonl` does, and again with math-verify alone
    (`Grader.second_opinions`); the lines where the two differ, grouped by our reason."""
    audit = Audit(source)
    with Grader(workers=workers) as grader:
        batch: list[tuple[int, dict[str, Any]]] = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                batch.append((number, _read_row(line, source, number)))
            if len(batch) >= batch_size:
                _audit_batch(grader, batch, audit)
                batch = []
        if batch:
            _audit_batch(grader, batch, audit)
    return audit


def reason_group(reason: str, method: str) -> str:
    """A verdict's reason without its values: `not_equivalent [decimal]`,
    `not_equivalent (as text: clock time) [rule]`, `equal_as_text: letter [normalised_string]`."""
    head = reason if reason.startswith("equal_as_text") else reason.split(":", 1)[0]
    if "(compared as text: " in reason:
        head += " (as text: " + reason.rsplit("(compared as text: ", 1)[1].rstrip(")") + ")"
    return f"{head} [{method}]"


def _audit_batch(grader: Grader, batch: list[tuple[int, dict[str, Any]]], audit: Audit) -> None:
    pairs = [(row["response"], row["answer"]) for _, row in batch]
    for (number, row), verdict, second in zip(batch, grader.grade_many(pairs), grader.second_opinions(pairs),
                                              strict=True):
        audit.graded += 1
        if second is None:
            audit.unanswered += 1
        elif second != verdict.correct:
            audit.by_reason.setdefault(reason_group(verdict.reason, verdict.method), []).append(
                Disagreement(number, row["answer"], verdict.extracted, verdict.correct, second, verdict.reason))
