"""Set aside problems that copy a benchmark item, before any model call (`decontaminate:`).

In:  the run's problems and the recipe's `decontaminate:` (benchmarks read like `problems:`,
     from a .jsonl, .parquet or dataset folder, or a hub dataset name where the network
     allows; only the problem column is read).
Out: the problems to answer, and one `Contaminated` record per problem set aside (its id and
     text, the benchmark's name, the item it matched with its row and id, the method and the
     score), which the flows publish as `contaminated/` and count per benchmark.

Both sides are compared after the same normalisation (`normalise`): Unicode NFKC,
lowercased, apostrophes and thousands separators removed, every other character that is not
a letter or a digit turned into a space, runs of spaces made one. So a copy with its case,
spacing or punctuation changed is the same text. Two methods, each flags on its own:

- `ngram` (as open-r1's decontamination): the problem shares a run of `ngram` consecutive
  words with a benchmark item. Items are indexed once, by the hashes of their word n-grams
  (an inverted index: n-gram hash -> items); a problem costs one set lookup per n-gram. An
  item wrapped in a longer prompt, or with one number changed, still shares whole runs of
  words, so it is caught. An n-gram found in `common` items or more of the same benchmark is
  boilerplate ("express your answer as a common fraction in simplest form"), not evidence of
  a copy, and is left out of the index. Score: the share of the item's indexed n-grams found
  in the problem, in %; the item with the highest share is the one recorded. An item shorter
  than `ngram` words has no n-gram: only `fuzzy` can catch it.
- `fuzzy` (as OpenThoughts' decontamination): rapidfuzz `fuzz.ratio` of the two normalised
  texts is at least `fuzzy`. We use `ratio`, the similarity of the *whole* texts, and not
  `partial_ratio` or `token_set_ratio`: those score 100 when the shorter text is found inside
  the longer one (partial) or its words are a subset of the other's (token set), so a short
  benchmark item ("What is 2 + 3?", "Find the sum of all integers from 1 to 100.") would flag
  every long problem that contains the same common phrase. `ratio` catches near-identical
  texts (a changed word or number, a typo) whatever their length; an item wrapped in a longer
  prompt is the n-gram method's to catch (and a short item wrapped in a long prompt is not
  caught: that is the price of not flagging common phrases).

`fuzzy` never compares every problem with every item. `ratio` >= c needs the indel
distance D <= (1 - c/100) * (la + lb), and D is at least the length difference and at least
the L1 distance of the two texts' character counts (every insertion or deletion changes one
count by one). So, with problems and items sorted by length, each block of problems is
compared only with the items in its length window, by one vectorised L1 of character counts
(the 12 most frequent letters first, then letters, digits, space, other); rapidfuzz scores
the few pairs left. The bounds are exact: no pair that would reach the cutoff is skipped.
bench/bench_decontamination.py: 100,000 problems against 10,000 items, both methods, in
6-8 s on 2 busy cores (normalising ~2 s, n-gram ~2.5 s, fuzzy ~4 s; the index ~1.2 s more).

A problem is checked against the benchmarks in the recipe's order and recorded with the
first one it matches (n-gram first, then fuzzy). Plain functions, no Prefect;
`decontaminated` applies it to a run's `ProblemShards` (flows/inputs/problem_shards.py)
after duplicates, shuffle and `limit`, before sharding: the problems kept are a subset of
those the run had without it, in the same order, so their journaled answers are reused.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flows.inputs.problems import ProblemSourceError, read_problems
from schemas.recipe import BenchmarkSpec, ColumnMap, DecontaminateSpec, ProblemsSpec
from schemas.records import Contaminated, Problem

if TYPE_CHECKING:
    from flows.inputs.problem_shards import ProblemShards

log = logging.getLogger("distillery.decontamination")

CHUNK = 20_000  # problems matched at once (a run's problems are read back this many at a time)
_FUZZY_BLOCK = 256  # problems (of similar length) compared with their items' window at once

_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NOT_WORD = re.compile(r"[\W_]+")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# character classes counted for the fuzzy bound: a-z, 0-9, space, anything else
_CLASSES = 38
_CLASS_OF = np.full(128, _CLASSES - 1, dtype=np.int64)
_CLASS_OF[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ", dtype=np.uint8)] = np.arange(_CLASSES - 1)
_FREQUENT = np.array([ord(c) - ord("a") for c in "etaoinshrdlu"])  # the most frequent letters in English


def normalise(text: str) -> str:
    """Lowercased, apostrophes and thousands separators dropped, other punctuation and
    spacing made single spaces: "It's  $1,000!" -> "its 1000"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", _APOSTROPHES.sub("", text))
    return " ".join(_NOT_WORD.sub(" ", text).split())


def words_of(text: str) -> list[str]:
    return normalise(text).split()


def ngram_hashes(words: Sequence[str], n: int) -> set[int]:
    """Hashes of the word n-grams of `words` (none when there are fewer than n words)."""
    if n <= 0 or len(words) < n:
        return set()
    return set(map(hash, zip(*(words[i:] for i in range(n)))))


@dataclass(frozen=True)
class BenchmarkItem:
    text: str
    row: int  # 0-based row in the benchmark source
    id: str | None = None  # when the benchmark maps an id column


@dataclass(frozen=True)
class Match:
    item: int  # index into the benchmark's items
    method: str  # ngram | fuzzy
    score: float
    shared: str


@dataclass
class BenchmarkIndex:
    """One benchmark, ready to match: its n-gram postings and its texts by length."""

    name: str
    items: list[BenchmarkItem]
    ngram: int
    fuzzy: float
    postings: dict[int, tuple[int, ...]]  # n-gram hash -> items that have it (boilerplate left out)
    indexed: np.ndarray  # per item: how many distinct n-grams it has in `postings`
    by_length: np.ndarray  # item indexes, shortest normalised text first
    lengths: np.ndarray  # their normalised lengths, ascending
    counts: np.ndarray  # their character counts, one row of _CLASSES each
    frequent: np.ndarray  # the counts of the _FREQUENT letters, one row per letter (contiguous)
    texts: list[str]  # their normalised texts


def read_benchmark(spec: BenchmarkSpec) -> list[BenchmarkItem]:
    """A benchmark's items: a local file or folder through `read_problems` (its checks and
    errors), else a hub dataset name through `datasets`."""
    columns = spec.columns
    try:
        if Path(spec.source).exists():
            # the answer column is not needed: mapping it to the problem column satisfies the reader
            mapped = ProblemsSpec(source=spec.source, split=spec.split,
                                  columns=ColumnMap(problem=columns.problem, answer=columns.problem, id=columns.id))
            return [BenchmarkItem(p.problem, p.source_row, p.id if columns.id else None)
                    for p in read_problems(mapped)]
        if _HUB_NAME.fullmatch(spec.source):
            return _hub_items(spec)
        raise ProblemSourceError(f"{spec.source}: not found (a .jsonl, .parquet, dataset folder or hub dataset name)")
    except ProblemSourceError as exc:
        raise ProblemSourceError(f"decontaminate: benchmark {spec.label}: {exc}") from None


def _hub_items(spec: BenchmarkSpec) -> list[BenchmarkItem]:
    import datasets

    try:
        rows = datasets.load_dataset(spec.source, split=spec.split)
    except Exception as exc:  # noqa: BLE001 - offline, no such dataset or split: one clear message
        raise ProblemSourceError(f"{spec.source}: not a local path, and not loadable from the hub "
                                 f"({type(exc).__name__}: {exc})") from None
    items = []
    for row_index, row in enumerate(rows):
        for column in filter(None, (spec.columns.problem, spec.columns.id)):
            if column not in row:
                raise ProblemSourceError(f"{spec.source} row {row_index}: missing column {column!r} "
                                         f"(columns there: {', '.join(map(str, row))})")
        text = str(row[spec.columns.problem] or "").strip()
        if not text:
            raise ProblemSourceError(f"{spec.source} row {row_index}: empty problem in column {spec.columns.problem!r}")
        items.append(BenchmarkItem(text, row_index, str(row[spec.columns.id]) if spec.columns.id else None))
    return items


def build_index(name: str, items: Sequence[BenchmarkItem], spec: DecontaminateSpec) -> BenchmarkIndex:
    """The n-gram postings and length-sorted texts of `items`, under `spec`'s settings."""
    items = list(items)
    postings: dict[int, list[int]] = defaultdict(list)
    texts = []
    for position, item in enumerate(items):
        words = words_of(item.text)
        texts.append(" ".join(words))
        for gram in ngram_hashes(words, spec.ngram):
            postings[gram].append(position)
    limit = spec.common or len(items) + 1
    kept = {gram: tuple(holders) for gram, holders in postings.items() if len(holders) < limit}
    indexed = np.bincount(np.fromiter((item for holders in kept.values() for item in holders), dtype=np.int64),
                          minlength=len(items))
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    by_length = np.argsort(lengths, kind="stable")
    counts = char_counts([texts[i] for i in by_length])
    return BenchmarkIndex(name=name, items=items, ngram=spec.ngram, fuzzy=spec.fuzzy, postings=kept, indexed=indexed,
                          by_length=by_length, lengths=lengths[by_length], counts=counts,
                          frequent=np.ascontiguousarray(counts[:, _FREQUENT].T), texts=[texts[i] for i in by_length])


def read_index(spec: BenchmarkSpec, settings: DecontaminateSpec) -> BenchmarkIndex:
    return build_index(spec.label, read_benchmark(spec), settings)


def ngram_match(index: BenchmarkIndex, words: Sequence[str]) -> Match | None:
    """The item sharing the largest share of its n-grams with a problem of these (normalised) words."""
    if not index.postings:
        return None
    hits = [gram for gram in ngram_hashes(words, index.ngram) if gram in index.postings]
    if not hits:
        return None
    shared = Counter(item for gram in hits for item in index.postings[gram])
    best = max(shared, key=lambda item: (shared[item] / index.indexed[item], -item))
    n = index.ngram
    first = next(" ".join(words[i:i + n]) for i in range(len(words) - n + 1)
                 if best in index.postings.get(hash(tuple(words[i:i + n])), ()))
    return Match(best, "ngram", round(100 * shared[best] / int(index.indexed[best]), 2), first)


def char_counts(texts: Sequence[str]) -> np.ndarray:
    """Per text, how many of each character class it holds (rows of _CLASSES int16)."""
    counts = np.zeros((len(texts), _CLASSES), dtype=np.int64)
    if texts:
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        classes = _CLASS_OF[np.minimum(codes, 127)]
        owner = np.repeat(np.arange(len(texts)), [len(t) for t in texts])
        counts = np.bincount(owner * _CLASSES + classes, minlength=len(texts) * _CLASSES).reshape(len(texts), -1)
    return counts.astype(np.int16 if counts.size == 0 or counts.max() < 2**15 else np.int32)


def fuzzy_matches(index: BenchmarkIndex, texts: Sequence[str], normalised: bool = False) -> list[Match | None]:
    """Per text, the item of highest `fuzz.ratio` >= the cutoff (None: no item reaches it);
    `normalised`: the texts are `normalise`d already."""
    if not index.fuzzy or not index.items:
        return [None] * len(texts)
    return _fuzzy(index, texts if normalised else [normalise(text) for text in texts])


def _fuzzy(index: BenchmarkIndex, normalised: Sequence[str]) -> list[Match | None]:
    from rapidfuzz import fuzz

    found: list[Match | None] = [None] * len(normalised)
    if not index.fuzzy or not index.items or not normalised:
        return found
    cutoff = index.fuzzy
    slack = 1 - cutoff / 100  # the indel distance allowed, per character of both texts
    lengths = np.fromiter(map(len, normalised), dtype=np.int64, count=len(normalised))
    counts = char_counts(normalised)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    shortest, longest = (cutoff / 100) / (2 - cutoff / 100), (2 - cutoff / 100) / (cutoff / 100)
    item_slack = (slack * index.lengths).astype(np.float32)
    for start in range(0, len(order), _FUZZY_BLOCK):
        block = order[start:start + _FUZZY_BLOCK]
        la = lengths[block]
        lo = int(np.searchsorted(index.lengths, la[0] * shortest - 1e-9, "left"))
        hi = int(np.searchsorted(index.lengths, la[-1] * longest + 1e-9, "right"))
        if lo >= hi:
            continue
        # the largest indel distance each pair may have (the margin is far below 1: distances are whole)
        allowed = (slack * la).astype(np.float32)[:, None] + item_slack[None, lo:hi] + np.float32(1e-3)
        # the L1 distance over the 12 most frequent letters first (a lower bound of the full one), a
        # letter at a time in place, then in full for the pairs it leaves
        mine = counts[block][:, _FREQUENT]
        coarse = np.abs(mine[:, :1] - index.frequent[0, lo:hi])
        step = np.empty_like(coarse)
        for letter in range(1, len(_FREQUENT)):
            np.subtract(mine[:, letter:letter + 1], index.frequent[letter, lo:hi], out=step)
            coarse += np.abs(step, out=step)
        rows, columns = np.nonzero(coarse <= allowed)
        full = np.abs(counts[block[rows]] - index.counts[lo + columns]).sum(axis=1)
        close = full <= allowed[rows, columns]
        for row, column in zip(rows[close].tolist(), columns[close].tolist()):
            text, item_text = normalised[block[row]], index.texts[lo + column]
            score = fuzz.ratio(text, item_text, score_cutoff=cutoff)
            current = found[block[row]]
            if score and (current is None or score > current.score):
                found[block[row]] = Match(int(index.by_length[lo + column]), "fuzzy", round(score, 2), item_text)
    return found


def find_contamination(problems: Iterable[Problem], spec: DecontaminateSpec,
                       indexes: Sequence[BenchmarkIndex] | None = None) -> list[Contaminated]:
    """The problems that copy an item of a benchmark of `spec`, in problem order."""
    indexes = list(indexes) if indexes is not None else [read_index(b, spec) for b in spec.against]
    found: list[Contaminated] = []
    chunk: list[Problem] = []
    for problem in problems:
        chunk.append(problem)
        if len(chunk) == CHUNK:
            found += [record for _, record in _chunk_matches(chunk, indexes)]
            chunk = []
    found += [record for _, record in _chunk_matches(chunk, indexes)]
    return found


def _chunk_matches(problems: Sequence[Problem], indexes: Sequence[BenchmarkIndex]) -> list[tuple[int, Contaminated]]:
    """(position in `problems`, record) of each problem that matches, in order."""
    matched: dict[int, tuple[BenchmarkIndex, Match]] = {}
    normalised = [normalise(problem.problem) for problem in problems]
    words = [text.split() for text in normalised]
    for index in indexes:
        left = [i for i in range(len(problems)) if i not in matched]
        for i in left:
            if (match := ngram_match(index, words[i])) is not None:
                matched[i] = (index, match)
        left = [i for i in left if i not in matched]
        for i, match in zip(left, fuzzy_matches(index, [normalised[i] for i in left], normalised=True)):
            if match is not None:
                matched[i] = (index, match)
    return [(i, _record(problems[i], *matched[i])) for i in sorted(matched)]


def _record(problem: Problem, index: BenchmarkIndex, match: Match) -> Contaminated:
    item = index.items[match.item]
    return Contaminated(id=problem.id, problem=problem.problem, source=problem.source, source_row=problem.source_row,
                        benchmark=index.name, benchmark_problem=item.text, benchmark_row=item.row,
                        benchmark_id=item.id, method=match.method, score=match.score, shared=match.shared)


def counts_by_benchmark(spec: DecontaminateSpec | None, found: Iterable[Contaminated]) -> dict[str, int]:
    """Problems set aside per benchmark, every benchmark of `spec` named (0 included)."""
    if spec is None:
        return {}
    counts = {benchmark.label: 0 for benchmark in spec.against}
    for record in found:
        counts[record.benchmark] = counts.get(record.benchmark, 0) + 1
    return counts


def decontaminated(shards: ProblemShards, spec: DecontaminateSpec | None) -> ProblemShards:
    """`shards` without the problems that copy a benchmark item, in the same order; the
    records of those set aside are its `set_aside`. Read back `CHUNK` problems at a time."""
    if spec is None:
        return shards
    indexes = [read_index(benchmark, spec) for benchmark in spec.against]
    keep = np.ones(shards.count, dtype=bool)
    found: list[Contaminated] = []
    for start in range(0, shards.count, CHUNK):
        stop = min(start + CHUNK, shards.count)
        problems = shards.lines.read(shards.offsets[start:stop], shards.lengths[start:stop])
        for position, record in _chunk_matches(problems, indexes):
            keep[start + position] = False
            found.append(record)
    if found:
        log.info("decontaminate: set aside %d problem(s) that copy benchmark items: %s", len(found),
                    ", ".join(f"{name} {n}" for name, n in counts_by_benchmark(spec, found).items()))
    return dataclasses.replace(shards, offsets=shards.offsets[keep], lengths=shards.lengths[keep],
                               set_aside=tuple(found))
