"""The journal's files on disk, below `RequestJournal` and `usage_by_shard`: the hash of a
key, the chunked reader of a JSONL file's lines, and the index files' format
(`<dir>.index/<shard>.idx`: header, usage, entries) with the checks that say whether
one still describes its JSONL file. See flows/models/journal.py for how they are used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger("distillery.journal")

_MAGIC = b"DJIDX002"
# magic, bytes covered, entries, digests of the first and last bytes covered and of what follows
_HEADER = struct.Struct("<8sQQ16s16s16s")
_USAGE = struct.Struct("<QQQ")  # after the header: answers, prompt tokens, completion tokens
_ENTRY = np.dtype([("hash", "<i8"), ("offset", "<u8"), ("length", "<u4")])  # one line, as stored
_PROBE = 4096  # bytes digested at each end of what an index file covers
_CHUNK = 1 << 24  # bytes read at a time when scanning a file


def index_directory(journal_directory: Path) -> Path:
    """Where the index files of a journal folder are: `<dir>.index`, beside it."""
    return journal_directory.with_name(journal_directory.name + ".index")


def _hash(key: str) -> int:
    return _hash_bytes(key.encode())


def _hash_bytes(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


# -- reading lines ---------------------------------------------------------------


def _lines(handle: BinaryIO, position: int, stop: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
    """The lines of a file from `position` (a line start) to `stop` (its end when None), read
    in chunks: (data, start, end, offset), the line being `data[start:end]` (no newline) at
    byte `offset` of the file. A last line without its newline comes with `end == len(data)`;
    every other line has its newline at `data[end]`."""
    handle.seek(position)
    rest = b""
    while chunk := handle.read(_CHUNK if stop is None else max(0, min(_CHUNK, stop - position - len(rest)))):
        data, start = rest + chunk, 0
        while (end := data.find(b"\n", start)) != -1:
            yield data, start, end, position + start
            start = end + 1
        position, rest = position + start, data[start:]
    if rest:
        yield rest, 0, len(rest), position



# -- index files -------------------------------------------------------------------


@dataclass
class _IndexFile:
    covered: int  # the bytes of the JSONL file it describes
    entries: np.ndarray  # of _ENTRY
    usage: tuple[int, int, int]  # the usage of the lines it covers: answers, prompt and completion tokens


def _read_index_file(path: str, journal_path: str) -> _IndexFile | None:
    """An index file when it still describes the start of its JSONL file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        magic, covered, count, head, tail, digest = _HEADER.unpack_from(data)
    except (OSError, struct.error):
        return None
    start = _HEADER.size + _USAGE.size
    if (magic != _MAGIC or len(data) - start != count * _ENTRY.itemsize
            or _digest(memoryview(data)[_HEADER.size :]) != digest):
        log.warning("%s: damaged index file, the shard is read again", path)
        return None
    if _probe(journal_path, covered) != (head, tail):
        log.info("%s changed since its index was written (replaced or cut): read again", journal_path)
        return None
    usage = _USAGE.unpack_from(data, _HEADER.size)
    return _IndexFile(covered, np.frombuffer(data, _ENTRY, count, start), usage)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _probe(path: str, covered: int) -> tuple[bytes, bytes] | None:
    """Digests of the first and the last bytes of the file's first `covered` bytes."""
    try:
        with open(path, "rb", buffering=0) as handle:
            if os.fstat(handle.fileno()).st_size < covered:
                return None
            head = os.pread(handle.fileno(), min(_PROBE, covered), 0)
            tail = os.pread(handle.fileno(), min(_PROBE, covered), max(0, covered - _PROBE))
    except FileNotFoundError:
        return None
    return _digest(head), _digest(tail)
