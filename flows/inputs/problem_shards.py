"""A run's problems in shards, on disk, read one shard at a time.

A run used to load every problem into memory and keep them for its whole length: ~1 KB of
Python objects a problem besides its text, so a million-problem run held gigabytes before
its first request. Instead `problem_shards` reads the source once, row by row, checking
each row as before (`read_problems`: bytes that are not UTF-8, bad JSON, a missing column,
an empty problem or answer name the file and row; a source with no row, or one id on two
rows with a different problem or answer, are errors too), and appends every problem as
one JSON line to `<state_dir>/problems/<digest of the problems spec>.jsonl`. What the run
keeps is each problem's line's byte offset and length (16 bytes), in run order:

- duplicates dropped: a repeat of an earlier problem (same id, problem and answer) is
  dropped (the same id with another problem or answer: `read_problems` has refused it). Found
  by sorting 64-bit hashes of the ids, then reading back the few lines whose hashes meet;
- shuffled with `random.Random(seed).shuffle`, as a list of problems was, so the run order
  (and with it every shard, and every cached result) is the one earlier versions had;
- cut to `limit`;
- with `decontaminate:`, without the problems that copy a benchmark item (`run_problems`,
  flows/inputs/decontamination.py: their records are the shards' `set_aside`).

`ProblemShards.read(i)` reads shard i's lines (one `pread` each) when the run starts that
shard. The file is written anew, under a temporary name, every time a run starts, and the
run holds it open from then on: a run started later on the same folder replaces the file
by name (and removes files of other problem settings), while this one goes on reading the
lines it wrote. It is not pushed to a URL `output_dir` (each machine's flow writes its own).
The built-in source is used as generated (its `limit` and `seed` drew it), as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import tempfile
import weakref
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.inputs.decontamination import decontaminated
from flows.inputs.problems import ProblemSourceError, arithmetic_problems, read_problems
from schemas.recipe import BUILTIN_ARITHMETIC, ProblemsSpec, Recipe
from schemas.records import Contaminated, Problem

log = logging.getLogger("distillery.problems")


@dataclass(frozen=True, eq=False)
class ProblemShards:
    """The run's problems, `shard_size` to a shard, read from `path` a shard at a time.

    Not iterable on purpose: `read` each shard when it starts, not all of them up front."""

    path: Path
    lines: _OpenLines  # the file this run wrote, held open
    offsets: np.ndarray  # byte offset of each problem's line, in run order
    lengths: np.ndarray  # and its length, without the newline
    shard_size: int
    set_aside: tuple[Contaminated, ...] = ()  # problems left out as copies of benchmark items (`decontaminate:`)

    @property
    def count(self) -> int:
        """How many problems the run has."""
        return len(self.offsets)

    def __len__(self) -> int:
        return -(-self.count // self.shard_size)

    def size(self, index: int) -> int:
        return len(self._lines_of(index)[0])

    def read(self, index: int) -> list[Problem]:
        """Shard `index`'s problems, in run order."""
        if not 0 <= index < len(self):
            raise IndexError(f"shard {index} of {len(self)}")
        return self.lines.read(*self._lines_of(index))

    def read_all(self) -> list[Problem]:
        return self.lines.read(self.offsets, self.lengths)

    def _lines_of(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        shard = slice(index * self.shard_size, (index + 1) * self.shard_size)
        return self.offsets[shard], self.lengths[shard]


def problem_shards(spec: ProblemsSpec, shard_size: int, folder: Path) -> ProblemShards:
    """The problems of `spec`, checked, deduplicated, shuffled and limited, in a file in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_spec_digest(spec)}.jsonl"
    partial = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        offsets, lengths, ids = _write_problems(spec, partial)
        lines = _OpenLines(partial)  # opened before the rename: a run replacing it at once cannot swap it
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    for stale in folder.glob("*.jsonl"):  # other problem settings' files; a run reading one holds it open
        if stale != path:
            stale.unlink(missing_ok=True)
    order = _run_order(spec, lines, offsets, lengths, ids)
    return ProblemShards(path, lines, np.asarray(offsets, dtype=np.int64)[order],
                         np.asarray(lengths, dtype=np.int64)[order], shard_size)


def run_problems(recipe: Recipe) -> ProblemShards:
    """The recipe's problems in its shards, written under its state folder, without those that
    copy a benchmark item (`decontaminate:`, flows/inputs/decontamination.py)."""
    shards = problem_shards(recipe.problems, recipe.shard_size, recipe.state_dir / "problems")
    return decontaminated(shards, recipe.decontaminate)


def load_problems(spec: ProblemsSpec) -> list[Problem]:
    """Every problem of `spec` in run order, in memory: for a plan's pilot, a check, a test."""
    with tempfile.TemporaryDirectory(prefix="distillery-problems-") as folder:
        return problem_shards(spec, 1, Path(folder)).read_all()


def _spec_digest(spec: ProblemsSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def _write_problems(spec: ProblemsSpec, path: Path) -> tuple[array, array, array]:
    """Every problem of the source as a line of `path`; per problem, in source order, its
    line's offset and length and a 64-bit hash of its id."""
    if spec.source == BUILTIN_ARITHMETIC:
        problems = iter(arithmetic_problems(spec.limit or 0, seed=spec.seed))
    elif spec.source.startswith("builtin:"):
        raise ProblemSourceError(f"unknown built-in problem source {spec.source!r} (known: {BUILTIN_ARITHMETIC})")
    else:
        problems = read_problems(spec)
    offsets, lengths, ids = array("q"), array("q"), array("q")
    position = 0
    with path.open("wb") as out:
        for problem in problems:
            line = problem.model_dump_json().encode()
            out.write(line + b"\n")
            offsets.append(position)
            lengths.append(len(line))
            position += len(line) + 1
            ids.append(_hash(problem.id))
    return offsets, lengths, ids


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _run_order(spec: ProblemsSpec, lines: _OpenLines, offsets: array, lengths: array, ids: array) -> list[int]:
    """Indexes of the written problems in run order: duplicates dropped, shuffled, limited.
    The built-in source's problems are in the order they were drawn."""
    if spec.source == BUILTIN_ARITHMETIC:
        return list(range(len(offsets)))
    kept = _without_duplicates(spec.source, lines, offsets, lengths, ids)
    if spec.shuffle:
        random.Random(spec.seed).shuffle(kept)
    return kept[: spec.limit] if spec.limit else kept


def _without_duplicates(source: str, lines: _OpenLines, offsets: array, lengths: array, id_hashes: array
                        ) -> list[int]:
    ids = np.frombuffer(id_hashes, dtype=np.int64) if len(id_hashes) else np.zeros(0, dtype=np.int64)
    by_id = np.argsort(ids, kind="stable")  # equal hashes stay in source order
    meets = np.flatnonzero(ids[by_id][1:] == ids[by_id][:-1])
    if not len(meets):
        return list(range(len(ids)))
    drop: set[int] = set()
    conflicts: list[tuple[int, str]] = []
    for group in _groups(by_id, meets):
        first: dict[str, Problem] = {}  # a colliding hash may hide several ids: compare the ids themselves
        read = lines.read(np.asarray([offsets[i] for i in group]), np.asarray([lengths[i] for i in group]))
        for index, problem in zip(group, read):
            earlier = first.setdefault(problem.id, problem)
            if earlier is problem:
                continue
            if (earlier.problem, earlier.answer) == (problem.problem, problem.answer):
                drop.add(index)
            else:  # `read_problems` has refused these; here only for a source rewritten while read
                conflicts.append((problem.source_row, f"{source} row {problem.source_row}: id {problem.id!r} already "
                                  f"used by row {earlier.source_row} with a different problem or answer"))
    if conflicts:
        raise ProblemSourceError(min(conflicts)[1])
    if drop:
        log.warning("%s: dropped %d duplicate problem(s)", source, len(drop))
    return [i for i in range(len(ids)) if i not in drop]


def _groups(by_id: np.ndarray, meets: np.ndarray) -> list[list[int]]:
    """Runs of equal hashes in `by_id`: `meets` are the positions p where by_id[p] and by_id[p + 1] meet."""
    groups: list[list[int]] = []
    for position in meets.tolist():
        if groups and groups[-1][-1] == int(by_id[position]):
            groups[-1].append(int(by_id[position + 1]))
        else:
            groups.append([int(by_id[position]), int(by_id[position + 1])])
    return groups


class _OpenLines:
    """A problems file held open for reading lines at known places (from any thread)."""

    def __init__(self, path: Path) -> None:
        self.descriptor = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.descriptor)

    def read(self, offsets: np.ndarray, lengths: np.ndarray) -> list[Problem]:
        return [Problem.model_validate_json(os.pread(self.descriptor, length, offset))
                for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True)]
