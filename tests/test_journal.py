"""The request journal: JSONL files as the truth, an index beside them for lookups and restarts."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from flows.models import journal as journal_module
from flows.models.journal import RequestJournal, index_directory


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


def test_only_the_tail_is_read_when_the_index_is_current(tmp_path, monkeypatch):
    written = fill(tmp_path / "j")
    with (tmp_path / "j" / "tool-shard-00001.jsonl").open("a") as other_writer:
        other_writer.write(foreign_line("late", answer(7)))
    read = []
    real_key_of = journal_module._key_of
    monkeypatch.setattr(journal_module, "_key_of", lambda data, *place: read.append(data) or real_key_of(data, *place))
    journal = RequestJournal(tmp_path / "j")
    assert len(read) == 1 and b"late" in read[0]
    assert journal.get("late") == answer(7) and len(journal) == len(written) + 1


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
    journal.close()


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
