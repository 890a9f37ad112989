"""The journal's usage accounting, what `budget:` counts: the model answers among a
journal file's lines and their tokens (`Usage`), read off a line's bytes without parsing
it when it is in `record`'s format (`_entry_of`), and summed by shard from the index files
and the lines they do not cover (`usage_by_shard`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.models.journal_files import _lines, _read_index_file, index_directory

_OPENING = b'{"key": "'
_OWN_LINE = re.compile(rb'\{"key": "([^"\\]*)", "time": [-+.eE0-9]+, "value": ')
_FINISH = b'"finish_reason"'
_PROMPT_TOKENS = b'"prompt_tokens"'
_TOKEN_COUNTS = re.compile(rb'"prompt_tokens": (\d{1,15}), "completion_tokens": (\d{1,15})[,}]')
_MOST_TOKENS = 10**15  # a count beyond this is not one (and would not fit the index file)
_UNSURE = object()  # a line only parsing can read
Tokens = tuple[int, int]  # an answer's prompt and completion tokens


# -- reading a line: its key and its tokens --------------------------------------------


def _entry_of(data: bytes, start: int, end: int, complete: bool = True) -> tuple[bytes, Tokens | None] | None:
    """The key (UTF-8) of the line `data[start:end]` and, when its value is a model answer,
    its tokens (`_answer_tokens`); None when the line is not an entry. Complete lines as
    `record` writes them are read without being parsed, 4x faster (a line glued to one cut
    short by a crash holds two openings, and is parsed)."""
    if (complete and (match := _OWN_LINE.match(data, start, end)) and data[end - 1] == 0x7D  # }
            and data.count(_OPENING, start, end) == 1
            and (tokens := _answer_tokens_unparsed(data, start, end)) is not _UNSURE):
        return match.group(1), tokens  # type: ignore[return-value]
    try:
        entry = json.loads(data[start:end])
        key = entry["key"]
    except (ValueError, KeyError, TypeError):
        return None
    return (key.encode(), _answer_tokens(entry.get("value"))) if isinstance(key, str) else None


def _answer_tokens(value: Any) -> Tokens | None:
    """(prompt, completion) tokens of a model answer: a value with a "finish_reason" (code
    executions have none). A count that is not a whole number counts 0."""
    if not isinstance(value, dict) or "finish_reason" not in value:
        return None
    prompt, completion = (value.get(name) for name in ("prompt_tokens", "completion_tokens"))
    return _whole(prompt), _whole(completion)


def _whole(count: Any) -> int:
    return count if type(count) is int and 0 <= count < _MOST_TOKENS else 0


def _answer_tokens_unparsed(data: bytes, start: int, end: int) -> Tokens | object | None:
    """`_answer_tokens` of a line in `record`'s format, read off its bytes; `_UNSURE` when only
    parsing can tell (the counts not as `ChatResponse.to_journal` writes them). A quoted name
    followed by `: ` is an object key (in a string its quotes would be escaped); no journal
    writer puts these names in an object nested in the value, so a key found is the value's."""
    at = data.rfind(_FINISH, start, end)
    if at == -1:
        return None
    if data[at + len(_FINISH) : at + len(_FINISH) + 2] != b": " or data[end - 2] != 0x7D:  # an object ends in }}
        return _UNSURE
    at = data.rfind(_PROMPT_TOKENS, start, end)
    if at == -1 or not (counts := _TOKEN_COUNTS.match(data, at, end)):
        return _UNSURE
    return int(counts[1]), int(counts[2])


# -- usage: what `budget:` counts ---------------------------------------------------


@dataclass
class Usage:
    """The model answers among a journal file's lines and their tokens. Every answer line
    counts, a key answered twice (a longer `max_tokens`, a merge) twice: each was paid for.
    Lines cut short by a crash and code executions count nothing."""

    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, tokens: Tokens | None) -> None:
        if tokens is not None:
            self.answers += 1
            self.prompt_tokens += tokens[0]
            self.completion_tokens += tokens[1]


def usage_by_shard(directory: Path) -> dict[str, Usage]:
    """The `Usage` of each journal file, by shard name: what its index file says of the bytes
    it still covers, and the rest read (the whole file without a trusted index). Needs no
    open journal and writes nothing."""
    directory = Path(directory)
    usage: dict[str, Usage] = {}
    names = sorted(name for name in os.listdir(directory) if name.endswith(".jsonl")) if directory.is_dir() else []
    for name in names:
        shard, path = name[: -len(".jsonl")], os.path.join(directory, name)
        indexed = _read_index_file(os.path.join(index_directory(directory), f"{shard}.idx"), path)
        if indexed is None:
            usage[shard] = _add_usage(path, 0, Usage())
        else:
            usage[shard] = _add_usage(path, indexed.covered, Usage(*indexed.usage))
    return usage


def _add_usage(path: str, position: int, usage: Usage, stop: int | None = None) -> Usage:
    """`usage` with the lines of the file from `position` to `stop` (its end when None) added."""
    try:
        with open(path, "rb") as handle:
            for data, start, end, _ in _lines(handle, position, stop):
                if (entry := _entry_of(data, start, end, complete=end < len(data))) is not None:
                    usage.add(entry[1])
    except FileNotFoundError:
        pass
    return usage
