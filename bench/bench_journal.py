"""Benchmark the request journal at a million requests: restart time, memory, lookups.

Writes `--requests` synthetic journaled answers (1–2 KB of content, reasoning text on a
third of them, no tool calls, token counts, latency, max_tokens) over files of 250, as a
run of 4,000 shards leaves them, then measures each journal in a fresh subprocess:

- open: cold (no index files: everything is read, and the index written), warm (index
  present), warm + tail (1% more lines appended after the index was written, as after a
  kill -9 or a merge with another machine's journal);
- peak RSS (`ru_maxrss`) after the imports, after open and after 10,000 random lookups;
- lookups per second (hits, random keys over all files), misses per second, records per
  second (2,000 appends to a fresh shard);
- `spent_in_journal` (what `budget:` counts on start): without index files (every line
  read), with the index current, and with 1% of the lines appended after it, against the
  function before the index held each file's usage (every line parsed).

"old" is the journal before the index (every entry in a dict; a copy is below, so the
bench keeps comparing after the code changes), and `spent_in_journal` before it read the
index (also copied); "new" is flows/models/journal.py and flows/models/budget.py. All
files are in the page cache (just written): open times are CPU, not disk.

Run: .venv/bin/python bench/bench_journal.py [--requests 1000000] [--dir /tmp/x] [--keep]
(about 3 minutes on 2 cores and 2 GB of disk for a million; --requests 100000 for a quick look)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from flows.models.journal import index_directory

PER_SHARD = 250
LOOKUPS = 10_000
RECORDS = 2_000
SENTENCES = [
    "We substitute x = {a} into the second equation and obtain {b}.",
    "Checking the parity of {a} rules out the odd case, so n must be even.",
    "The sum of the first {a} terms is {b}, which matches the closed form.",
    "Let me double-check: {a} * {b} = {c}, and the remainder modulo 7 is {d}.",
    "Therefore the probability is \\frac{{{a}}}{{{b}}}, which simplifies no further.",
    "Wait, the constraint says the digits are distinct, so {a} cannot appear twice.",
    "By the triangle inequality the third side is below {c} and above {d}.",
    "```python\nprint(sum(i * i for i in range({a})))\n```\nThe output is {c}.",
]


def sentence_pool(rng: random.Random, size: int = 4096) -> list[str]:
    return [rng.choice(SENTENCES).format(a=rng.randint(2, 999), b=rng.randint(2, 9999), c=rng.randint(2, 99999),
                                         d=rng.randint(0, 6)) for _ in range(size)]


def synthetic_value(rng: random.Random, pool: list[str]) -> dict[str, Any]:
    content = " ".join(rng.choices(pool, k=rng.randint(14, 30))) + f" The answer is \\boxed{{{rng.randrange(999)}}}."
    reasoning = " ".join(rng.choices(pool, k=rng.randint(4, 10))) if rng.random() < 1 / 3 else None
    return {"content": content, "reasoning_content": reasoning, "tool_calls": [], "finish_reason": "stop",
            "prompt_tokens": rng.randint(80, 600), "completion_tokens": rng.randint(300, 900),
            "latency_s": round(rng.uniform(0.5, 40), 3), "max_tokens": 16384}


def key_of(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


def shard_of(i: int) -> str:
    return f"tool-shard-{i // PER_SHARD:05d}"


def write_journal(directory: Path, requests: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    directory.mkdir(parents=True)
    handle = None
    for i in range(requests):
        if i % PER_SHARD == 0:
            if handle:
                handle.close()
            handle = (directory / f"{shard_of(i)}.jsonl").open("w", encoding="utf-8")
        entry = {"key": key_of(i), "time": round(time.time(), 3), "value": synthetic_value(rng, pool)}
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    if handle:
        handle.close()


def append_tail(directory: Path, requests: int, count: int, seed: int) -> None:
    """`count` more lines in random files, written after the index (keys past `requests`)."""
    rng = random.Random(seed + 1)
    pool = sentence_pool(rng)
    for i in range(requests, requests + count):
        with (directory / f"{shard_of(rng.randrange(requests))}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key_of(i), "time": 0.0, "value": synthetic_value(rng, pool)},
                                    ensure_ascii=False) + "\n")


class OldJournal:
    """flows/models/journal.py before the index: every entry read into a dict on open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: dict[str, dict[str, Any]] = {}
        self._files: dict[str, IO[str]] = {}
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        pass

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        return None if entry is None else entry["value"]

    def record(self, shard: str, key: str, value: dict[str, Any]) -> None:
        entry = {"key": key, "time": round(time.time(), 3), "value": value}
        self._entries[key] = entry
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = (self.directory / f"{shard}.jsonl").open("a", encoding="utf-8")
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def old_spent_in_journal(journal_dir: Path) -> tuple[int, int]:
    """flows/models/budget.py's `spent_in_journal` before the index held usage (tokens and
    answers; prices left out): every line of every file parsed."""
    tokens, answers = 0, 0
    for path in sorted(journal_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    value = json.loads(line)["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if "finish_reason" not in value:
                    continue
                tokens += (value.get("prompt_tokens") or 0) + (value.get("completion_tokens") or 0)
                answers += 1
    return tokens, answers


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, directory: Path, requests: int, records: bool) -> None:
    """One measurement, in its own process; prints a JSON line."""
    import numpy  # noqa: F401 - both children pay for it: the flows import it anyway

    from flows.models.journal import RequestJournal

    logging.disable(logging.WARNING)
    cls = OldJournal if kind == "old" else RequestJournal
    figures: dict[str, Any] = {"imports_mb": peak_mb()}
    start = time.perf_counter()
    journal = cls(directory)
    figures["open_s"] = time.perf_counter() - start
    figures["open_mb"] = peak_mb()
    figures["entries"] = len(journal)
    rng = random.Random(7)
    hits = [key_of(rng.randrange(requests)) for _ in range(LOOKUPS)]
    misses = [key_of(requests * 10 + i) for i in range(LOOKUPS)]
    start = time.perf_counter()
    found = sum(journal.get(key) is not None for key in hits)
    figures["hits_per_s"] = LOOKUPS / (time.perf_counter() - start)
    assert found == LOOKUPS, f"{kind}: {LOOKUPS - found} keys not found"
    start = time.perf_counter()
    assert not any(journal.get(key) is not None for key in misses)
    figures["misses_per_s"] = LOOKUPS / (time.perf_counter() - start)
    figures["lookups_mb"] = peak_mb()
    if records:
        pool = sentence_pool(rng)
        values = [synthetic_value(rng, pool) for _ in range(RECORDS)]
        start = time.perf_counter()
        for i, value in enumerate(values):
            journal.record("bench-records", key_of(-1 - i), value)
        journal.close()
        figures["records_per_s"] = RECORDS / (time.perf_counter() - start)
    else:
        journal.close()
    print(json.dumps(figures))


def spent_child(kind: str, directory: Path) -> None:
    """`spent_in_journal` (or the old one), in its own process; prints a JSON line."""
    from flows.models.budget import spent_in_journal

    logging.disable(logging.WARNING)
    figures: dict[str, Any] = {"imports_mb": peak_mb()}
    start = time.perf_counter()
    if kind == "spent-old":
        tokens, answers = old_spent_in_journal(directory)
    else:
        tokens, _, answers = spent_in_journal(directory, {})
    figures.update(spent_s=time.perf_counter() - start, spent_mb=peak_mb(), tokens=tokens, answers=answers)
    print(json.dumps(figures))


def measure(kind: str, directory: Path, requests: int, records: bool = False) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--dir", str(directory), "--requests", str(requests)]
    if records:
        command.append("--records")
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, help="where to write the journal (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the journal afterwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["old", "new", "spent-old", "spent-new"], help=argparse.SUPPRESS)
    parser.add_argument("--records", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("spent-old", "spent-new"):
        spent_child(args.child, args.dir)
        return
    if args.child:
        child(args.child, args.dir, args.requests, args.records)
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-journal-"))
    directory = root / "journal"
    index = index_directory(directory)
    try:
        start = time.perf_counter()
        write_journal(directory, args.requests, args.seed)
        size = sum(path.stat().st_size for path in directory.glob("*.jsonl"))
        print(f"wrote {args.requests:,} requests in {args.requests // PER_SHARD:,} files: {size / 2**30:.2f} GiB, "
              f"{size / args.requests:,.0f} B a line, {time.perf_counter() - start:.0f} s")

        spent = {"new, no index": measure("spent-new", directory, args.requests)}
        runs = {"new, cold": measure("new", directory, args.requests)}
        index_bytes = sum(path.stat().st_size for path in index.glob("*.idx"))
        runs["new, warm"] = measure("new", directory, args.requests)
        spent["new, warm"] = measure("spent-new", directory, args.requests)
        append_tail(directory, args.requests, args.requests // 100, args.seed)
        spent["new, warm + 1% tail"] = measure("spent-new", directory, args.requests)
        spent["old"] = measure("spent-old", directory, args.requests)
        assert len({(run["tokens"], run["answers"]) for run in spent.values()}) == 2, spent  # the tail, or not
        runs["new, warm + 1% tail"] = measure("new", directory, args.requests, records=True)
        (directory / "bench-records.jsonl").unlink()
        (index / "bench-records.idx").unlink()
        runs["old"] = measure("old", directory, args.requests, records=True)

        print(f"index files: {index_bytes / 2**20:.1f} MiB on disk\n")
        rows = [("entries", "entries", "{:,}"), ("open (s)", "open_s", "{:.2f}"),
                ("peak RSS after imports (MB)", "imports_mb", "{:,.0f}"),
                ("peak RSS after open (MB)", "open_mb", "{:,.0f}"),
                (f"peak RSS after {LOOKUPS:,} lookups (MB)", "lookups_mb", "{:,.0f}"),
                ("lookups/s (hits)", "hits_per_s", "{:,.0f}"), ("lookups/s (misses)", "misses_per_s", "{:,.0f}"),
                ("records/s", "records_per_s", "{:,.0f}")]
        table(runs, rows)
        print()
        table(spent, [("spent_in_journal: answers", "answers", "{:,}"), ("time (s)", "spent_s", "{:.2f}"),
                      ("peak RSS after imports (MB)", "imports_mb", "{:,.0f}"),
                      ("peak RSS after (MB)", "spent_mb", "{:,.0f}")])
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else directory, ignore_errors=True)
            shutil.rmtree(index, ignore_errors=True)


def table(runs: dict[str, dict[str, Any]], rows: list[tuple[str, str, str]]) -> None:
    width = max(len(label) for label, _, _ in rows)
    print(f"{'':{width}}" + "".join(f"{name:>22}" for name in runs))
    for label, field, form in rows:
        cells = [form.format(run[field]) if field in run else "" for run in runs.values()]
        print(f"{label:{width}}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
