"""Read problems from a file, a dataset folder, or the built-in generator.

Sources: `.jsonl`, `.parquet`, a local Hugging Face dataset folder (saved with
`save_to_disk`, or data files `load_dataset` understands), or `builtin:arithmetic`
(seeded easy word problems for the demo). Columns are mapped by the recipe; a
missing column, an empty problem or an empty answer raises `ProblemSourceError`
naming the file and the row. Without an id column, the id is derived from the
problem text, so it stays the same across reruns and reorderings.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

from schemas.recipe import BUILTIN_ARITHMETIC, ProblemsSpec
from schemas.records import Problem

class ProblemSourceError(ValueError):
    """A problem source that cannot be used; the message names the file and row."""


def stable_id(problem_text: str) -> str:
    return "p-" + hashlib.sha256(problem_text.strip().encode()).hexdigest()[:16]


def read_problems(spec: ProblemsSpec) -> Iterator[Problem]:
    """Every row of a file or dataset source as a problem, in source order, duplicates included
    (`flows.inputs.problem_shards` drops them, shuffles and limits)."""
    cols = spec.columns
    for row_index, row in enumerate(_read_rows(Path(spec.source), spec.split)):
        where = f"{spec.source} row {row_index}"
        if not isinstance(row, dict):
            raise ProblemSourceError(f"{where}: expected an object, got {type(row).__name__}")
        wanted = [cols.problem, cols.answer] + ([cols.id] if cols.id else [])
        for column in wanted:
            if column not in row:
                raise ProblemSourceError(
                    f"{where}: missing column {column!r} (columns there: {', '.join(map(str, row)) or 'none'}); "
                    "map columns with problems.columns in the recipe"
                )
        text = _as_text(row[cols.problem])
        answer = _as_text(row[cols.answer])
        if not text:
            raise ProblemSourceError(f"{where}: empty problem in column {cols.problem!r}")
        if not answer:
            raise ProblemSourceError(f"{where}: empty answer in column {cols.answer!r}")
        problem_id = _as_text(row[cols.id]) if cols.id else stable_id(text)
        if not problem_id:
            raise ProblemSourceError(f"{where}: empty id in column {cols.id!r}")
        yield Problem(id=problem_id, problem=text, answer=answer, source=spec.source, source_row=row_index)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _read_rows(path: Path, split: str) -> Iterator[dict]:
    if not path.exists():
        raise ProblemSourceError(f"{path}: problem source not found")
    if path.is_dir():
        yield from _read_dataset_folder(path, split)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise ProblemSourceError(f"{path}: unsupported problem file (use .jsonl, .parquet or a dataset folder)")


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as lines:
        row_index = 0
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemSourceError(f"{path} row {row_index} (line {line_number}): not valid JSON: {exc.msg}") from None
            row_index += 1


def _read_dataset_folder(path: Path, split: str) -> Iterator[dict]:
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ProblemSourceError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(str(path), split=split)
        except ValueError as exc:
            raise ProblemSourceError(f"{path}: cannot load split {split!r}: {exc}") from None
    yield from loaded


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
