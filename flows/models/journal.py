"""The request journal: every finished model request (and code execution), on disk.

Entries are keyed by a hash of what determines the answer — model name, messages,
sampling parameters, sample index — and never by the endpoint URL or the key, so
moving a teacher to another server keeps every answer already paid for. Each
entry is appended to `<dir>/<shard>.jsonl` as one `{"key", "time", "value"}` line and
flushed as soon as it completes, so a crash or a kill -9 loses at most the requests
still in flight. On a rerun finished requests are answered from the journal.

The JSONL files are the only source of truth (append-only; `distillery status` and the
object-store sync read and merge them). Beside them, an index says where each line is:

- in memory, four parallel numpy arrays sorted by a 64-bit hash of the key — hash, file,
  byte offset, line length: 24 bytes an entry (24 MB for a million requests) — plus a
  dict of the entries added since they were last merged. `get` looks the hash up
  (a missing key never touches the disk), reads the line (one pread) and checks its key;
  values are not kept, apart from an LRU of the last `CACHED_VALUES`;
- on disk, `<dir>.index/<shard>.idx` (beside the journal folder, not in it: readers of
  the journal list its folder): the entries of one file and the number of bytes
  they cover, with digests of the first and last bytes covered, and the `Usage` of those
  lines (model answers and their tokens: what `budget:` counts on start, `usage_by_shard`;
  both in journal_usage.py, the files' format in journal_files.py).
  On open a shard's index is trusted up to those bytes when the digests still match, and
  only the lines appended since (by this run, another machine, a merge) are read; otherwise
  the file is read whole. Index files are rewritten every `PERSIST_EVERY` records and on
  `close()`, never needed for correctness: delete them and the next open rebuilds them.
  (An index file written before the usage was in it still serves lookups; on open the
  lines it covers are read once for their usage, and it is written again with it.)

A key journaled twice (a longer `max_tokens` asked again, an execution replayed into
another shard, merged journals) resolves to its newest entry by `time`, ties to the last
line in file-name order (the old in-memory journal kept the last line read).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.models.journal_files import (
    _ENTRY,
    _HEADER,
    _MAGIC,
    _USAGE,
    _digest,
    _hash,
    _hash_bytes,
    _lines,
    _probe,
    _read_index_file,
    index_directory,
)
from flows.models.journal_usage import Tokens, Usage, _add_usage, _entry_of
from flows.models.keys import request_key  # noqa: F401 - the journal's key, imported from here by clients

log = logging.getLogger("distillery.journal")

PERSIST_EVERY = 4096  # records between two writes of the changed shards' index files
CACHED_VALUES = 2048  # values of the latest gets and records kept in memory
OPEN_FOR_APPEND = 256  # shard files held open for appending at once

_temporary_names = itertools.count()


@dataclass
class _Shard:
    name: str
    path: str  # os.path strings: opening 4,000 files by pathlib costs a tenth of a second
    covered: int = 0  # every complete line before this byte is in the index
    persisted: int = 0  # the bytes its index file covers
    loose: int = -1  # a last line without its newline that was read already (its offset)
    usage: Usage = field(default_factory=Usage)  # of the lines before `covered`


def _cover(shard: _Shard, entry: tuple[bytes, Tokens | None] | None, end: int) -> None:
    """The shard's index covers the lines up to `end` now, the last one `entry`: count its usage."""
    shard.covered = end
    if entry is not None:
        shard.usage.add(entry[1])


class RequestJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index_directory = index_directory(Path(directory))
        self._shards: list[_Shard] = []
        self._ids: dict[str, int] = {}
        # the sorted index: parallel arrays, hash order
        self._hashes = np.empty(0, np.int64)
        self._files = np.empty(0, np.uint32)
        self._offsets = np.empty(0, np.uint64)
        self._lengths = np.empty(0, np.uint32)
        self._recent: dict[int, list[tuple[int, int, int]]] = {}  # added since the last merge
        self._values: OrderedDict[str, Any] = OrderedDict()
        self._appending: OrderedDict[int, int] = OrderedDict()  # shard id -> O_APPEND descriptor
        self._count: int | None = None
        self._unpersisted = 0
        self._index_writable = True
        self._lock = threading.RLock()  # shards may record from worker threads
        self._load()

    # -- the API -------------------------------------------------------------------

    def __len__(self) -> int:
        """Distinct keys (by their 64-bit hash)."""
        with self._lock:
            if self._count is None:
                self._merge()
                h = self._hashes
                self._count = int(h.size and 1 + np.count_nonzero(h[1:] != h[:-1]))
            return self._count

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            if (value := self._values.get(key)) is not None:
                self._values.move_to_end(key)
                return value
            found = [entry for place in self._candidates(_hash(key))
                     if (entry := self._read(*place)) is not None and entry["key"] == key]
            if not found:
                return None
            # the newest when journaled twice; max() keeps the first of equals: the last line
            value = max(found, key=lambda entry: entry.get("time") or 0)["value"]
            self._remember(key, value)
            return value

    def record(self, shard: str, key: str, value: dict[str, Any]) -> None:
        entry = {"key": key, "time": round(time.time(), 3), "value": value}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            file = self._shard_id(shard)
            end = self._append(file, line)  # in the OS page cache now: survives a kill -9 of this process
            start = end - len(line)
            state = self._shards[file]
            if state.covered < start:
                self._scan(file, stop=start)  # lines another writer appended before ours
            self._add(_hash(key), file, start, len(line) - 1)
            if state.covered == start:
                _cover(state, _entry_of(line, 0, len(line) - 1), end)  # read as a scan reads it: the same usage
            self._remember(key, value)
            self._unpersisted += 1
            if self._unpersisted >= PERSIST_EVERY:
                self._persist()

    def close(self) -> None:
        with self._lock:
            self._persist()
            for descriptor in self._appending.values():
                os.close(descriptor)
            self._appending.clear()

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every readable entry of every file, in file-name then line order (reads it all)."""
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open("rb") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                        if isinstance(entry, dict) and isinstance(entry["key"], str):
                            yield entry
                    except (ValueError, KeyError):
                        continue

    @property
    def _entries(self) -> dict[str, dict[str, Any]]:
        """The old in-memory dict, key -> entry, built by reading everything (tests/test_flow.py
        still reads it; use `entries()`)."""
        return {entry["key"]: entry for entry in self.entries()}

    # -- opening -------------------------------------------------------------------

    def _load(self) -> None:
        if not self.directory.exists():
            return
        parts: list[tuple[int, np.ndarray]] = []
        for name in sorted(name for name in os.listdir(self.directory) if name.endswith(".jsonl")):
            file = self._shard_id(name[: -len(".jsonl")])
            if (indexed := self._read_index(file)) is not None:
                parts.append((file, indexed))
            if (scanned := self._scan(file, into_recent=False)) is not None:
                parts.append((file, scanned))
        if parts:
            self._hashes = np.concatenate([entries["hash"] for _, entries in parts])
            order = np.argsort(self._hashes)
            self._hashes = self._hashes[order]
            self._files = np.concatenate([np.full(len(entries), file, np.uint32) for file, entries in parts])[order]
            self._offsets = np.concatenate([entries["offset"] for _, entries in parts])[order]
            self._lengths = np.concatenate([entries["length"] for _, entries in parts])[order]
        self._persist(catch_up=False)  # what had to be read is not read again next time

    def _read_index(self, file: int) -> np.ndarray | None:
        """The entries of the shard's index file when it still describes the start of the JSONL file."""
        shard = self._shards[file]
        if (indexed := _read_index_file(self._index_path(shard.name), shard.path)) is None:
            return None
        shard.covered = shard.persisted = indexed.covered
        if indexed.usage is not None:
            shard.usage = Usage(*indexed.usage)
        else:  # an index file from before the usage was in it: its lines are counted once, and it is rewritten
            shard.usage = _add_usage(shard.path, 0, Usage(), stop=indexed.covered)
            shard.persisted = 0
        return indexed.entries

    def _scan(self, file: int, stop: int | None = None, into_recent: bool = True) -> np.ndarray | None:
        """Index the complete lines from `covered` to `stop` (the end of the file when None).
        Lines cut short by a crash are skipped with a warning. A last line without its newline
        is indexed once (parsed: it may be cut short) but not covered, nor its usage counted,
        until its newline comes."""
        shard = self._shards[file]
        hashes, offsets, lengths = array("q"), array("Q"), array("I")
        try:
            with open(shard.path, "rb") as handle:
                if handle.seek(0, os.SEEK_END) < shard.covered:
                    log.warning("%s is shorter than when it was indexed: read again", shard.path)
                    self._forget(file)
                for data, start, end, offset in _lines(handle, shard.covered, stop):
                    complete = end < len(data)
                    if offset == shard.loose:  # indexed when it had no newline yet
                        if complete:
                            _cover(shard, _entry_of(data, start, end), offset + end - start + 1)
                        continue
                    if (entry := _entry_of(data, start, end, complete)) is None:
                        # A line cut short by a crash: that request is simply sent again.
                        log.warning("%s byte %d: unreadable journal entry skipped", shard.path, offset)
                    else:
                        hashes.append(_hash_bytes(entry[0]))
                        offsets.append(offset)
                        lengths.append(end - start)
                    if complete:
                        _cover(shard, entry, offset + end - start + 1)
                    else:
                        shard.loose = offset
        except FileNotFoundError:
            return None
        entries = np.empty(len(hashes), _ENTRY)
        entries["hash"], entries["offset"], entries["length"] = hashes, offsets, lengths
        if into_recent:
            for h, offset, length in zip(hashes, offsets, lengths, strict=True):
                self._add(h, file, offset, length)
        return entries if len(entries) else None

    # -- the index -----------------------------------------------------------------

    def _candidates(self, h: int) -> list[tuple[int, int, int]]:
        """(file, offset, length) of the lines whose key has this hash, the last line first."""
        found = list(self._recent.get(h, ()))
        i = int(self._hashes.searchsorted(h))
        while i < len(self._hashes) and self._hashes[i] == h:
            found.append((int(self._files[i]), int(self._offsets[i]), int(self._lengths[i])))
            i += 1
        if len(found) > 1:
            found.sort(key=lambda place: (self._shards[place[0]].name, place[1]), reverse=True)
        return found

    def _add(self, h: int, file: int, offset: int, length: int) -> None:
        self._recent.setdefault(h, []).append((file, offset, length))
        self._count = None

    def _merge(self) -> None:
        """Move the recent entries into the sorted arrays."""
        if not self._recent:
            return
        rows = [(h, *place) for h, places in self._recent.items() for place in places]
        self._recent.clear()
        hashes = np.fromiter((row[0] for row in rows), np.int64, len(rows))
        order = np.argsort(hashes)
        at = self._hashes.searchsorted(hashes[order])
        self._hashes = np.insert(self._hashes, at, hashes[order])
        for name, dtype, column in (("_files", np.uint32, 1), ("_offsets", np.uint64, 2), ("_lengths", np.uint32, 3)):
            values = np.fromiter((row[column] for row in rows), dtype, len(rows))[order]
            setattr(self, name, np.insert(getattr(self, name), at, values))

    def _forget(self, file: int) -> None:
        """Drop a shard's entries (its file was cut or replaced): it is read again from the start."""
        self._merge()
        keep = self._files != file
        self._hashes, self._files = self._hashes[keep], self._files[keep]
        self._offsets, self._lengths = self._offsets[keep], self._lengths[keep]
        self._values.clear()
        shard = self._shards[file]
        shard.covered = shard.persisted = 0
        shard.loose = -1
        shard.usage = Usage()
        self._count = None

    def _persist(self, catch_up: bool = True) -> None:
        """Write the index file of every shard known beyond what its index file covers."""
        self._unpersisted = 0
        changed = [file for file, shard in enumerate(self._shards) if shard.covered != shard.persisted]
        for file in changed if catch_up else ():
            self._scan(file)  # lines other writers appended since
        self._merge()
        if not changed or not self._index_writable:
            return
        rows = np.flatnonzero(np.isin(self._files, np.array(changed, np.uint32)))
        rows = rows[np.lexsort((self._offsets[rows], self._files[rows]))]
        bounds = np.searchsorted(self._files[rows], np.array(changed, np.uint32), side="right")
        starts = np.searchsorted(self._files[rows], np.array(changed, np.uint32), side="left")
        for file, start, stop in zip(changed, starts, bounds, strict=True):
            shard = self._shards[file]
            mine = rows[start:stop]
            mine = mine[self._offsets[mine] < shard.covered]
            entries = np.empty(len(mine), _ENTRY)
            entries["hash"], entries["offset"], entries["length"] = (
                self._hashes[mine], self._offsets[mine], self._lengths[mine])
            entries = entries[np.unique(entries["offset"], return_index=True)[1]]  # a loose line indexed twice
            if not self._write_index(shard, entries):
                return

    def _write_index(self, shard: _Shard, entries: np.ndarray) -> bool:
        probe = _probe(shard.path, shard.covered)
        if probe is None:
            return True
        usage = shard.usage
        body = _USAGE.pack(usage.answers, usage.prompt_tokens, usage.completion_tokens) + entries.tobytes()
        header = _HEADER.pack(_MAGIC, shard.covered, len(entries), *probe, _digest(body))
        path = self._index_path(shard.name)
        temporary = os.path.join(os.path.dirname(path), f".{shard.name}.{os.getpid()}-{next(_temporary_names)}.tmp")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temporary, "wb") as out:
                out.write(header + body)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("%s: cannot write the journal index (%s); it is rebuilt from the files on the "
                        "next start", os.path.dirname(path), exc)
            self._index_writable = False
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return False
        shard.persisted = shard.covered
        return True

    # -- the files -----------------------------------------------------------------

    def _shard_id(self, name: str) -> int:
        if (file := self._ids.get(name)) is None:
            file = self._ids[name] = len(self._shards)
            self._shards.append(_Shard(name, os.path.join(self.directory, f"{name}.jsonl")))
        return file

    def _index_path(self, name: str) -> str:
        return os.path.join(self.index_directory, f"{name}.idx")

    def _append(self, file: int, line: bytes) -> int:
        """Append one line with a single write; the end offset it landed at."""
        descriptor = self._appending.get(file)
        if descriptor is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self._shards[file].path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(descriptor).st_size
            if size and os.pread(descriptor, 1, size - 1) != b"\n":
                os.write(descriptor, b"\n")  # after a line cut short by a crash: ours stays readable
            self._appending[file] = descriptor
            if len(self._appending) > OPEN_FOR_APPEND:
                os.close(self._appending.popitem(last=False)[1])
        self._appending.move_to_end(file)
        view = memoryview(line)
        while view:
            view = view[os.write(descriptor, view) :]
        return os.lseek(descriptor, 0, os.SEEK_CUR)

    def _read(self, file: int, offset: int, length: int) -> dict[str, Any] | None:
        path = self._shards[file].path
        try:
            with open(path, "rb", buffering=0) as handle:
                entry = json.loads(os.pread(handle.fileno(), length, offset))
            if isinstance(entry, dict) and "key" in entry and "value" in entry:
                return entry
        except (OSError, ValueError):
            pass
        log.warning("%s byte %d: unreadable journal entry (was the file replaced?)", path, offset)
        return None

    def _remember(self, key: str, value: Any) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        if len(self._values) > CACHED_VALUES:
            self._values.popitem(last=False)
