"""Read problems from a file, a dataset folder, or the built-in generator.

Sources: `.jsonl`, `.parquet`, a local Hugging Face dataset folder (saved with
`save_to_disk`, or data files `load_dataset` understands), or `builtin:arithmetic`
(seeded easy word problems for the demo). Columns are mapped by the recipe; a
missing column, an empty problem or an empty answer raises `ProblemSourceError`
naming the file and the row, and so do bytes that are not UTF-8 (with the line of a
`.jsonl` file), a source with no row, and one id on two rows with a different problem
or answer (naming both rows). Without an id column, the id is derived from the
problem text, so it stays the same across reruns and reorderings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from schemas.recipe import BUILTIN_ARITHMETIC, ProblemsSpec
from schemas.records import Problem

if TYPE_CHECKING:
    import pyarrow as pa


class ProblemSourceError(ValueError):
    """A problem source that cannot be used; the message names the file and row."""


def stable_id(problem_text: str) -> str:
    return "p-" + hashlib.sha256(problem_text.strip().encode()).hexdigest()[:16]


def read_problems(spec: ProblemsSpec) -> Iterator[Problem]:
    """Every row of a file or dataset source as a problem, in source order, duplicates included
    (`flows.inputs.problem_shards` drops them, shuffles and limits).

    Raises `ProblemSourceError` at the first bad row (bytes that are not UTF-8, bad JSON, a
    missing column, an empty problem or answer) and, once every row is read, for a source with
    no row or for one id on two rows with a different problem or answer (naming both)."""
    path, seen = Path(spec.source), _Fingerprints()
    for row_index, (row, _line) in enumerate(_read_rows(path, spec.split)):
        try:
            problem = _problem(spec, row_index, row)
            seen.add(problem)
        except UnicodeEncodeError:  # a JSON escape such as "\udcff": text that UTF-8 cannot hold
            raise _not_utf8_text(spec, row_index, row) from None
        yield problem
    if not seen.count:
        raise ProblemSourceError(f"{spec.source}: no problems in it ({_why_empty(path, spec.split)})")
    suspects = seen.suspects()
    if suspects:
        _refuse_a_clash(spec, path, suspects)


def _refuse_a_clash(spec: ProblemsSpec, path: Path, rows: set[int]) -> None:
    """Read `rows` again, and raise for the first whose id an earlier one of them has with
    another problem or answer (naming both, and their lines in a .jsonl file)."""
    first: dict[str, tuple[Problem, int | None]] = {}
    for row_index, (row, line) in enumerate(_read_rows(path, spec.split)):
        if row_index not in rows:
            continue
        problem = _problem(spec, row_index, row)
        earlier, earlier_line = first.setdefault(problem.id, (problem, line))
        if (earlier.problem, earlier.answer) != (problem.problem, problem.answer):
            lines = f" (line {earlier_line} and line {line})" if line else ""
            raise ProblemSourceError(f"{spec.source} row {row_index}: id {problem.id!r} already used by row "
                                     f"{earlier.source_row} with a different problem or answer{lines}")


def _problem(spec: ProblemsSpec, row_index: int, row: object) -> Problem:
    """One row as a problem; a `ProblemSourceError` naming the file and row if it cannot be one."""
    cols = spec.columns
    where = f"{spec.source} row {row_index}"
    if not isinstance(row, dict):
        raise ProblemSourceError(f"{where}: expected an object, got {type(row).__name__}")
    wanted = [column for column in (cols.problem, cols.answer, cols.id) if column]
    for column in wanted:
        if column not in row:
            raise ProblemSourceError(
                f"{where}: missing column {column!r} (columns there: {', '.join(map(str, row)) or 'none'}); "
                "map columns with problems.columns in the recipe"
            )
    text = _as_text(row[cols.problem], where, cols.problem)
    answer = _as_text(row[cols.answer], where, cols.answer) if cols.answer else ""
    problem_id = _as_text(row[cols.id], where, cols.id) if cols.id else ""
    if not text:
        raise ProblemSourceError(f"{where}: empty problem in column {cols.problem!r}")
    if cols.answer and not answer:
        raise ProblemSourceError(f"{where}: empty answer in column {cols.answer!r}")
    if cols.id and not problem_id:
        raise ProblemSourceError(f"{where}: empty id in column {cols.id!r}")
    return Problem(id=problem_id or stable_id(text), problem=text, answer=answer, source=spec.source,
                   source_row=row_index)


def _as_text(value: object, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise ProblemSourceError(f"{where}: column {column!r} is {_not_utf8(exc)}") from None
    text = str(value).strip()
    if not text.isascii():
        text.encode()  # UnicodeEncodeError for text UTF-8 cannot hold, which `read_problems` names
    return text


def _not_utf8_text(spec: ProblemsSpec, row_index: int, row: dict) -> ProblemSourceError:
    """The error for a row with text UTF-8 cannot hold, naming its column."""
    for column in (spec.columns.problem, spec.columns.answer, spec.columns.id):
        try:
            str(row.get(column, "") if column else "").encode()
        except UnicodeEncodeError as exc:
            return ProblemSourceError(f"{spec.source} row {row_index}: column {column!r} is not valid UTF-8 "
                                      f"({exc.reason})")
    return ProblemSourceError(f"{spec.source} row {row_index}: text that is not valid UTF-8")


class _Fingerprints:
    """Per row, 64-bit hashes of its id and of its problem and answer: 16 bytes a row, not
    the ~1 KB of a `Problem`. Rows whose ids' hashes meet with different problems' hashes
    are read again once every row is read (one id with two problems, or a rare collision)."""

    def __init__(self) -> None:
        self.ids, self.contents = array("q"), array("q")

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, problem: Problem) -> None:  # `hash`: compared within this process only
        self.ids.append(hash(problem.id))
        self.contents.append(hash((problem.problem, problem.answer)))

    def suspects(self) -> set[int]:
        """The rows of every id hash that comes with more than one problem hash."""
        if self.count < 2:
            return set()
        ids, contents = np.frombuffer(self.ids, dtype=np.int64), np.frombuffer(self.contents, dtype=np.int64)
        by_id = np.argsort(ids, kind="stable")
        starts = np.concatenate(([True], ids[by_id][1:] != ids[by_id][:-1]))
        group = np.cumsum(starts) - 1  # per sorted row, which id hash it has
        differs = contents[by_id] != contents[by_id][np.flatnonzero(starts)][group]
        return set(by_id[np.isin(group, group[differs])].tolist()) if differs.any() else set()


def _why_empty(path: Path, split: str) -> str:
    if path.is_dir():
        return f"split {split!r} has 0 rows"
    if path.suffix == ".jsonl":
        return "the file is empty" if path.stat().st_size == 0 else "the file has only blank lines"
    return "the file has 0 rows"


def _read_rows(path: Path, split: str) -> Iterator[tuple[object, int | None]]:
    """Each row of the source with its 1-based line (.jsonl) or None (other sources)."""
    if not path.exists():
        raise ProblemSourceError(f"{path}: problem source not found")
    if path.is_dir():
        yield from ((row, None) for row in _read_dataset_folder(path, split))
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from ((row, None) for row in _read_parquet(path))
    else:
        raise ProblemSourceError(f"{path}: unsupported problem file (use .jsonl, .parquet or a dataset folder)")


def _read_jsonl(path: Path) -> Iterator[tuple[object, int]]:
    """Read as bytes, a line at a time, so a line that is not UTF-8 is named by its number."""
    with path.open("rb") as lines:
        row_index = 0
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ProblemSourceError(f"{path} row {row_index} (line {line_number}): "
                                         f"{_not_utf8(exc, 'the line')}") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), line_number
            except json.JSONDecodeError as exc:
                raise ProblemSourceError(f"{path} row {row_index} (line {line_number}): "
                                         f"not valid JSON: {exc.msg}") from None
            row_index += 1


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:  # text that is not UTF-8: find its row
                for offset in range(batch.num_rows):
                    try:
                        batch.slice(offset, 1).to_pylist()
                    except UnicodeDecodeError as exc:
                        raise _not_utf8_row(path, row_index + offset, batch.slice(offset, 1), exc) from None
                raise
            yield from rows
            row_index += len(rows)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise ProblemSourceError(f"{path} row {row_index}: cannot read the Parquet file: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_dataset_folder(path: Path, split: str) -> Iterator[dict]:
    import datasets
    from datasets.data_files import EmptyDatasetError

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - as below; `datasets` cannot load a saved dataset of 0 rows
            if not any(path.rglob("*.arrow")):
                raise ProblemSourceError(f"{path}: no problems in it (the saved dataset has no data files)") from None
            raise ProblemSourceError(f"{path}: cannot load the saved dataset: {_one_line(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ProblemSourceError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(str(path), split=split)
        except EmptyDatasetError:
            raise ProblemSourceError(f"{path}: no problems in it (no data files: give .jsonl or .parquet files, "
                                     "or a dataset saved with save_to_disk)") from None
        except Exception as exc:  # noqa: BLE001 - whatever `datasets` raises, one line naming the folder
            if _only_blank_files(path):
                raise ProblemSourceError(f"{path}: no problems in it (its data files are empty)") from None
            cause = f" ({type(exc.__cause__).__name__}: {_one_line(exc.__cause__)})" if exc.__cause__ else ""
            raise ProblemSourceError(f"{path}: cannot load split {split!r}: {_one_line(exc)}{cause}") from None
    rows = iter(loaded)
    for row_index in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise _not_utf8_row(path, row_index, loaded.data.table.slice(row_index, 1), exc) from None
        yield row


def _only_blank_files(folder: Path) -> bool:
    files = [f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".") and f.suffix != ".md"]
    return bool(files) and all(f.stat().st_size < 1 << 20 and not f.read_bytes().strip() for f in files)


def _not_utf8_row(path: Path, row_index: int, row: pa.Table | pa.RecordBatch, exc: UnicodeDecodeError
                  ) -> ProblemSourceError:
    """The error for a row with text that is not UTF-8 (`row`: an Arrow table or batch of that
    row alone), naming the column where it can be found."""
    for name in row.schema.names:
        try:
            row.column(name).to_pylist()
        except UnicodeDecodeError as found:
            return ProblemSourceError(f"{path} row {row_index}: column {name!r} is {_not_utf8(found)}")
    return ProblemSourceError(f"{path} row {row_index}: {_not_utf8(exc)}")


def _not_utf8(exc: UnicodeDecodeError, of: str = "the value") -> str:
    return f"not valid UTF-8 ({exc.object[exc.start]:#04x} is byte {exc.start + 1} of {of}); save it as UTF-8"


# --- the built-in generator -------------------------------------------------

_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemi", "Liam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells"]


def _word_problem(rng: random.Random) -> tuple[str, int]:
    """One-step problems with small numbers: the demo's toy teacher can get some right."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(30, 99)
        b = rng.randint(5, a - 5)
        return f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in all?", a * b
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    return f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?", q


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct easy word problems with integer answers, the same for the same seed."""
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > count * 50:
            raise ProblemSourceError(f"{BUILTIN_ARITHMETIC}: cannot make {count} distinct problems")
        text, answer = _word_problem(rng)
        pid = stable_id(text)
        if pid not in problems:
            problems[pid] = Problem(
                id=pid, problem=text, answer=str(answer), source=BUILTIN_ARITHMETIC, source_row=len(problems)
            )
    return list(problems.values())
