"""The request journal: JSONL files as the truth, an index beside them for lookups and restarts."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from flows.models import journal as journal_module
from flows.models import journal_usage
from flows.models.journal import RequestJournal, index_directory
from flows.models.journal_usage import Usage, usage_by_shard


def answer(i: int) -> dict:
    return {"content": f"answer {i} " + "x" * (i % 50), "finish_reason": "stop", "tool_calls": [],
            "prompt_tokens": i, "completion_tokens": 2 * i}


def fill(directory, count: int = 60, shards: int = 3) -> dict[str, dict]:
    journal = RequestJournal(directory)
    written = {f"k{i}": answer(i) for i in range(count)}
    for i, (key, value) in enumerate(written.items()):
        journal.record(f"tool-shard-{i % shards:05d}", key, value)
    journal.close()
    return written


def assert_holds(journal: RequestJournal, written: dict[str, dict]) -> None:
    assert len(journal) == len(written)
    for key, value in written.items():
        assert journal.get(key) == value, key
    assert journal.get("missing") is None


def foreign_line(key: str, value: dict) -> str:
    """A line as another machine's journal writes it."""
    return json.dumps({"key": key, "time": 1.0, "value": value}, ensure_ascii=False) + "\n"


def test_lookups_after_a_restart(tmp_path):
    written = fill(tmp_path / "j")
    assert len(list(index_directory(tmp_path / "j").glob("*.idx"))) == 3
    assert all(path.suffix == ".jsonl" for path in (tmp_path / "j").iterdir())  # the index is beside the folder
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_the_files_keep_their_format(tmp_path):
    fill(tmp_path / "j", count=4, shards=2)
    lines = (tmp_path / "j" / "tool-shard-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["k0", "k2"]
    assert set(json.loads(lines[0])) == {"key", "time", "value"} and json.loads(lines[0])["value"] == answer(0)


def test_the_index_is_never_needed(tmp_path):
    written = fill(tmp_path / "j")
    shutil.rmtree(index_directory(tmp_path / "j"))
    assert_holds(RequestJournal(tmp_path / "j"), written)
    assert len(list(index_directory(tmp_path / "j").glob("*.idx"))) == 3  # rebuilt on open


def test_a_damaged_index_file_is_rebuilt(tmp_path, caplog):
    written = fill(tmp_path / "j")
    index = index_directory(tmp_path / "j") / "tool-shard-00001.idx"
    data = bytearray(index.read_bytes())
    data[-3] ^= 0xFF
    index.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "distillery.journal"):
        assert_holds(RequestJournal(tmp_path / "j"), written)
    assert "damaged index" in caplog.text


def test_lines_appended_after_the_index_was_written_are_read(tmp_path):
    written = fill(tmp_path / "j")
    with (tmp_path / "j" / "tool-shard-00001.jsonl").open("a") as other_writer:
        for i in range(100, 110):
            other_writer.write(foreign_line(f"k{i}", answer(i)))
            written[f"k{i}"] = answer(i)
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_only_the_tail_is_read_when_the_index_is_current(tmp_path):
    """Opening a journal whose index is current reads the index and the lines after it, not
    the lines it already describes: counted as the bytes this process reads (/proc/self/io)."""
    directory = tmp_path / "j"
    journal = RequestJournal(directory)
    written = {f"k{i}": {**answer(i), "content": f"answer {i} " + "y" * 2000} for i in range(600)}
    for key, value in written.items():
        journal.record("tool-shard-00001", key, value)
    journal.close()
    with (directory / "tool-shard-00001.jsonl").open("a") as other_writer:
        other_writer.write(foreign_line("late", answer(7)))
    written["late"] = answer(7)
    jsonl_bytes = (directory / "tool-shard-00001.jsonl").stat().st_size

    def bytes_read() -> int:
        return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

    before = bytes_read()
    journal = RequestJournal(directory)
    opened = bytes_read() - before
    assert opened < jsonl_bytes / 20, (opened, jsonl_bytes)
    assert_holds(journal, written)


def test_a_file_replaced_by_a_longer_merged_one(tmp_path):
    written = fill(tmp_path / "j")
    path = tmp_path / "j" / "tool-shard-00002.jsonl"
    merged = tmp_path / "merged.jsonl"
    merged.write_bytes(path.read_bytes() + foreign_line("remote", answer(3)).encode())
    os.replace(merged, path)  # a new file (inode), the old lines first
    written["remote"] = answer(3)
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_a_file_replaced_by_a_different_one_is_read_again(tmp_path):
    written = fill(tmp_path / "j")
    path = tmp_path / "j" / "tool-shard-00002.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    for key in [json.loads(line)["key"] for line in lines]:
        del written[key]
    # another file, longer than the indexed one, where the indexed lines are not at their offsets
    replacement = [foreign_line(f"other{i}", answer(200 + i)) for i in range(len(lines) + 5)]
    written.update({f"other{i}": answer(200 + i) for i in range(len(lines) + 5)})
    path.write_text("".join(replacement))
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_a_file_cut_shorter_is_read_again(tmp_path):
    written = fill(tmp_path / "j")
    path = tmp_path / "j" / "tool-shard-00000.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]))
    for line in lines[5:]:
        del written[json.loads(line)["key"]]
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_a_file_cut_while_the_journal_is_open(tmp_path):
    fill(tmp_path / "j", count=6, shards=1)
    journal = RequestJournal(tmp_path / "j")
    path = tmp_path / "j" / "tool-shard-00000.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    journal.record("tool-shard-00000", "new", answer(9))
    journal.close()
    assert_holds(RequestJournal(tmp_path / "j"), {"k0": answer(0), "k1": answer(1), "new": answer(9)})


def test_a_torn_last_line_is_skipped_and_the_next_record_stays_readable(tmp_path, caplog):
    written = fill(tmp_path / "j")
    with (tmp_path / "j" / "tool-shard-00000.jsonl").open("a") as crashed:
        crashed.write('{"key": "torn", "val')
    with caplog.at_level(logging.WARNING, "distillery.journal"):
        journal = RequestJournal(tmp_path / "j")
    assert "unreadable journal entry skipped" in caplog.text
    assert_holds(journal, written)
    assert journal.get("torn") is None
    journal.record("tool-shard-00000", "after", answer(1))  # appended after the torn line, not glued to it
    journal.close()
    written["after"] = answer(1)
    shutil.rmtree(index_directory(tmp_path / "j"))
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_a_last_line_without_its_newline_is_still_an_entry(tmp_path):
    directory = tmp_path / "j"
    directory.mkdir()
    (directory / "s.jsonl").write_text(foreign_line("a", answer(1)) + foreign_line("b", answer(2)).rstrip("\n"))
    journal = RequestJournal(directory)
    assert_holds(journal, {"a": answer(1), "b": answer(2)})
    journal.record("s", "c", answer(3))
    journal.close()
    assert [json.loads(line)["key"] for line in (directory / "s.jsonl").read_text().splitlines()] == ["a", "b", "c"]
    assert_holds(RequestJournal(directory), {"a": answer(1), "b": answer(2), "c": answer(3)})


def test_a_key_journaled_twice(tmp_path):
    directory = tmp_path / "j"
    directory.mkdir()
    (directory / "a.jsonl").write_text(foreign_line("dup", answer(1)) + foreign_line("tie", answer(5)))
    (directory / "b.jsonl").write_text(foreign_line("dup", answer(1)) + foreign_line("tie", answer(6)))
    assert_holds(RequestJournal(directory), {"dup": answer(1), "tie": answer(6)})  # equal times: the last line
    # answered again (a longer max_tokens), into the file read first: the newest answer wins
    journal = RequestJournal(directory)
    journal.record("a", "dup", answer(2))
    assert journal.get("dup") == answer(2) and len(journal) == 2
    journal._values.clear()
    assert journal.get("dup") == answer(2)
    journal.close()
    assert RequestJournal(directory).get("dup") == answer(2)
    shutil.rmtree(index_directory(directory))
    assert RequestJournal(directory).get("dup") == answer(2)


def test_values_are_read_from_disk_and_the_cache_is_never_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "CACHED_VALUES", 4)
    written = fill(tmp_path / "j", count=20)
    journal = RequestJournal(tmp_path / "j")
    assert journal.get("k1") == answer(1)
    assert len(journal._values) == 1  # nothing else held in memory
    for i in range(20):
        assert journal.get(f"k{i}") == answer(i)
    assert len(journal._values) == 4
    journal.record("tool-shard-00000", "k19", answer(99))  # k19 is cached
    journal.record("tool-shard-00000", "k2", answer(98))  # k2 is not
    assert journal.get("k19") == answer(99) and journal.get("k2") == answer(98)
    for i in range(10):  # evict both
        journal.get(f"k{i + 5}")
    assert journal.get("k19") == answer(99) and journal.get("k2") == answer(98)
    assert len(journal) == len(written)


def test_a_missing_key_does_not_touch_the_disk(tmp_path, monkeypatch):
    fill(tmp_path / "j")
    journal = RequestJournal(tmp_path / "j")
    monkeypatch.setattr(journal_module.os, "pread", lambda *_: pytest.fail("read the disk"))
    assert all(journal.get(f"nope{i}") is None for i in range(1000))


def test_records_are_on_disk_at_once_and_indexed_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "PERSIST_EVERY", 10)
    journal = RequestJournal(tmp_path / "j")
    for i in range(25):
        journal.record("s", f"k{i}", answer(i))
    assert len((tmp_path / "j" / "s.jsonl").read_text().splitlines()) == 25  # flushed line by line
    indexed = RequestJournal(tmp_path / "j")  # a kill -9 now: the index covers 20, the rest is scanned
    assert_holds(indexed, {f"k{i}": answer(i) for i in range(25)})
    assert (index_directory(tmp_path / "j") / "s.idx").stat().st_size < 1000


def test_two_writers_on_one_shard(tmp_path):
    first, second = RequestJournal(tmp_path / "j"), RequestJournal(tmp_path / "j")
    written = {}
    for i in range(30):
        writer = first if i % 3 else second
        writer.record("s", f"k{i}", answer(i))
        written[f"k{i}"] = answer(i)
    # each sees its own records and, once it writes after them, the other's
    assert first.get("k28") == answer(28) and first.get("k27") == answer(27)
    first.close()
    second.close()
    assert_holds(RequestJournal(tmp_path / "j"), written)
    shutil.rmtree(index_directory(tmp_path / "j"))
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_an_index_that_cannot_be_written_is_not_an_error(tmp_path, monkeypatch, caplog):
    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(journal_module.os, "replace", refuse)
    with caplog.at_level(logging.WARNING, "distillery.journal"):
        written = fill(tmp_path / "j")
    assert "cannot write the journal index" in caplog.text
    monkeypatch.undo()
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_an_empty_or_absent_directory(tmp_path):
    assert len(RequestJournal(tmp_path / "absent")) == 0 and not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    journal = RequestJournal(tmp_path / "empty")
    assert journal.get("k") is None
    journal.record("s", "k", {"v": 1})
    journal.close()
    assert RequestJournal(tmp_path / "empty").get("k") == {"v": 1}


def test_entries_reads_every_file(tmp_path):
    written = fill(tmp_path / "j", count=9)
    journal = RequestJournal(tmp_path / "j")
    assert {entry["key"]: entry["value"] for entry in journal.entries()} == written
    assert {key: entry["value"] for key, entry in journal._entries.items()} == written


def test_keys_and_values_that_need_escaping(tmp_path):
    written = {'a "quoted" key': answer(1), "back\\slash": answer(2), "ünïcødé ключ": answer(3),
               "line\nbreak": answer(4), "nested": {"key": "inner", "value": {"key": "deeper"}}}
    journal = RequestJournal(tmp_path / "j")
    for key, value in written.items():
        journal.record("s", key, value)
    journal.close()
    shutil.rmtree(index_directory(tmp_path / "j"))
    assert_holds(RequestJournal(tmp_path / "j"), written)


def test_a_torn_line_glued_to_the_next_one_is_skipped(tmp_path, caplog):
    directory = tmp_path / "j"
    directory.mkdir()
    torn = foreign_line("torn", {"content": "\\frac{1}{2}"})[:-7]  # ends with "}", no newline
    # a writer that does not end the torn line first (as the journal did before its index)
    (directory / "s.jsonl").write_text(foreign_line("a", answer(1)) + torn + foreign_line("b", answer(2)))
    (directory / "t.jsonl").write_text(foreign_line("c", answer(3)) + torn)  # still the last line
    with caplog.at_level(logging.WARNING, "distillery.journal"):
        journal = RequestJournal(directory)
    assert caplog.text.count("unreadable journal entry skipped") == 2
    assert_holds(journal, {"a": answer(1), "c": answer(3)})
    assert journal.get("torn") is None and journal.get("b") is None


# -- usage: what `budget:` counts on start, from the index ----------------------------


def parsed_usage(directory) -> dict[str, Usage]:
    """Every line of every file parsed: what `spent_in_journal` read before the index held usage."""
    usage = {}
    for path in sorted(directory.glob("*.jsonl")):
        usage[path.stem] = Usage()
        for line in path.read_bytes().split(b"\n"):
            try:
                entry = json.loads(line)
                value = entry["value"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(entry["key"], str) and isinstance(value, dict) and "finish_reason" in value:
                usage[path.stem].add((value.get("prompt_tokens") or 0, value.get("completion_tokens") or 0))
    return usage


def execution(i: int) -> dict:
    return {"output": f"{i}\n", "failed": False}


def test_usage_is_the_index_s_and_equals_reading_every_line(tmp_path):
    directory = tmp_path / "j"
    written = fill(directory)
    journal = RequestJournal(directory)
    for i in range(5):
        journal.record("tool-shard-00000", f"exec{i}", execution(i))  # code executions count nothing
    journal.record("tool-shard-00001", "k1", answer(40))  # answered again: both lines count
    journal.close()
    assert usage_by_shard(directory) == parsed_usage(directory)
    assert sum(usage.answers for usage in usage_by_shard(directory).values()) == len(written) + 1


def test_usage_after_lines_appended_by_another_writer(tmp_path):
    directory = tmp_path / "j"
    fill(directory)
    with (directory / "tool-shard-00001.jsonl").open("a") as other_writer:
        other_writer.write(foreign_line("late", answer(7)))
        compact = json.dumps({"key": "compact", "time": 2.0, "value": answer(8)}, separators=(",", ":"))
        other_writer.write(compact + "\n")
        other_writer.write(foreign_line("no usage", {"content": "x", "finish_reason": "stop"}))
        other_writer.write(foreign_line("nulls", {**answer(9), "prompt_tokens": None}))
        other_writer.write(foreign_line("quoted", {"output": 'a "finish_reason": 3', "failed": True}))
    assert usage_by_shard(directory) == parsed_usage(directory)  # the index covers what fill() wrote
    journal = RequestJournal(directory)  # reads the new lines, counts them into the index
    journal.close()
    assert usage_by_shard(directory) == parsed_usage(directory)


def test_usage_with_torn_lines(tmp_path):
    directory = tmp_path / "j"
    fill(directory)
    path = directory / "tool-shard-00000.jsonl"
    confident = {**answer(3), "confidence": {"tokens": 6, "mean_logprob": -0.2}, "max_tokens": 64}
    line = foreign_line("torn", confident)
    with path.open("a") as crashed:  # cut after its token counts: in the middle, then at the end
        crashed.write(line[: line.index(', "max_tokens"')] + "\n" + foreign_line("whole", answer(2)) + line[:-30])
    assert usage_by_shard(directory) == parsed_usage(directory)
    journal = RequestJournal(directory)
    journal.record("tool-shard-00000", "after", answer(4))  # the torn line gets its newline first
    journal.close()
    assert usage_by_shard(directory) == parsed_usage(directory)
    shutil.rmtree(index_directory(directory))
    assert usage_by_shard(directory) == parsed_usage(directory)


def test_usage_of_a_last_line_without_its_newline(tmp_path):
    directory = tmp_path / "j"
    directory.mkdir()
    (directory / "s.jsonl").write_text(foreign_line("a", answer(1)) + foreign_line("b", answer(2)).rstrip("\n"))
    RequestJournal(directory).close()  # indexes "b" but covers only "a"
    assert usage_by_shard(directory) == parsed_usage(directory) == {"s": Usage(2, 3, 6)}
    journal = RequestJournal(directory)
    journal.record("s", "c", answer(3))
    journal.close()
    assert usage_by_shard(directory) == parsed_usage(directory) == {"s": Usage(3, 6, 12)}


def test_usage_without_an_index_or_with_a_stale_one(tmp_path):
    directory = tmp_path / "j"
    fill(directory)
    expected = parsed_usage(directory)
    shutil.rmtree(index_directory(directory))
    assert usage_by_shard(directory) == expected
    RequestJournal(directory).close()
    path = directory / "tool-shard-00002.jsonl"
    path.write_text("".join(foreign_line(f"other{i}", answer(300 + i)) for i in range(40)))  # replaced, longer
    (directory / "tool-shard-00000.jsonl").write_text(foreign_line("short", answer(5)))  # cut shorter
    assert usage_by_shard(directory) == parsed_usage(directory) != expected
    journal = RequestJournal(directory)
    journal.record("tool-shard-00002", "new", answer(6))
    journal.close()
    assert usage_by_shard(directory) == parsed_usage(directory)
    assert usage_by_shard(tmp_path / "absent") == {}


def without_usage(index) -> None:
    """Rewrite an index file as the first format wrote it: no usage after the header."""
    data = index.read_bytes()
    _, covered, count, head, tail, _ = journal_module._HEADER.unpack_from(data)
    body = data[journal_module._HEADER.size + journal_module._USAGE.size :]
    header = journal_module._HEADER.pack(b"DJIDX001", covered, count, head, tail, journal_module._digest(body))
    index.write_bytes(header + body)


def test_an_index_in_an_older_format_is_read_again(tmp_path):
    directory = tmp_path / "j"
    written = fill(directory)
    for index in index_directory(directory).glob("*.idx"):
        without_usage(index)  # the first index format, which no journal reads any more
    assert usage_by_shard(directory) == parsed_usage(directory)  # read from the files
    journal = RequestJournal(directory)
    assert_holds(journal, written)
    journal.record("tool-shard-00000", "new", answer(7))
    journal.close()
    written["new"] = answer(7)
    assert_holds(RequestJournal(directory), written)
    assert usage_by_shard(directory) == parsed_usage(directory)


def test_usage_with_two_writers_on_one_shard(tmp_path):
    first, second = RequestJournal(tmp_path / "j"), RequestJournal(tmp_path / "j")
    for i in range(30):
        (first if i % 3 else second).record("s", f"k{i}", answer(i) if i % 4 else execution(i))
    second.close()
    first.close()
    assert usage_by_shard(tmp_path / "j") == parsed_usage(tmp_path / "j")


def test_lines_the_journal_reads_without_parsing_count_as_parsed(tmp_path):
    """The bytes-only reading of an answer line gives what parsing it gives."""
    values = [answer(5), execution(1), {**answer(2), "confidence": {"tokens": 3, "mean_logprob": -0.2}},
              {**answer(3), "content": 'he said "prompt_tokens": 99, "completion_tokens": 98}'},
              {**answer(4), "reasoning_content": "finish_reason"}, {"finish_reason": "length"},
              {**answer(6), "completion_tokens": 2.5}, {**answer(7), "prompt_tokens": -1},
              {**answer(8), "prompt_tokens": 10**16}, {"content": "x", "finish_reason": None, "prompt_tokens": 4},
              ["finish_reason"], "finish_reason", None]
    for value in values:
        line = foreign_line("k", value).rstrip("\n").encode()
        entry = json.loads(line)
        assert journal_usage._entry_of(line, 0, len(line)) == (b"k", journal_usage._answer_tokens(entry["value"]))
    line = foreign_line("k", answer(5)).rstrip("\n").encode()
    assert journal_usage._answer_tokens_unparsed(line, 0, len(line)) == (5, 10)  # not parsed
