"""The request journal: every finished model request (and code execution), on disk.

Entries are keyed by a hash of what determines the answer — model name, messages,
sampling parameters, sample index — and never by the endpoint URL or the key, so
moving a teacher to another server keeps every answer already paid for. Each
entry is appended to `<dir>/<shard>.jsonl` and flushed as soon as it completes, so
a crash or a kill -9 loses at most the requests still in flight. On a rerun the
whole directory is read back and finished requests are answered from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("distillery.journal")


def request_key(kind: str, payload: dict[str, Any]) -> str:
    """Stable hash of a request's content (`kind` separates model calls from executions)."""
    canonical = json.dumps({"kind": kind, **payload}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RequestJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: dict[str, dict[str, Any]] = {}
        self._files: dict[str, IO[str]] = {}
        self._load()

    def _load(self) -> None:
        if not self.directory.exists():
            return
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open(encoding="utf-8") as lines:
                for line_number, line in enumerate(lines, start=1):
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # A line cut short by a crash: that request is simply sent again.
                        log.warning("%s line %d: unreadable journal entry skipped", path, line_number)

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
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = self._files[shard] = (self.directory / f"{shard}.jsonl").open("a", encoding="utf-8")
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()  # in the OS page cache now: survives a kill -9 of this process

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
