"""The row spool: finished shards' rows on disk, published in shard order as if held in memory."""

from __future__ import annotations

import json

import pytest
from fake_openai import FakeOpenAIServer
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from test_publish import CARD, Row, make_rows

from flows.publishing.parquet import features_for, publish_dataset, read_dataset_rows
from flows.publishing.report import summarise
from flows.publishing.spool import RowSpool
from schemas.records import Composite, GradedTrajectory, Rejected


def test_spooled_shards_publish_the_same_files_as_the_rows_in_memory(tmp_path):
    rows = make_rows(11)
    spool = RowSpool(tmp_path / "spool", {"rows": Row})
    spool.add(3, {"rows": rows[7:]})  # shards finish in any order; a shard may have no rows
    spool.add(0, {"rows": rows[:5]})
    spool.add(1, {"rows": []})
    spool.add(2, {"rows": rows[5:7]})
    spool.add(2, {"rows": rows[5:7]})  # added again (a retried shard): replaces, not doubles
    in_memory = publish_dataset(tmp_path / "a", rows, features_for(Row), CARD, rows_per_file=4)
    spooled = publish_dataset(tmp_path / "b", spool.rows("rows"), features_for(Row), CARD, rows_per_file=4)
    assert spooled.num_rows == 11 and [f.name for f in spooled.files] == [f.name for f in in_memory.files]
    assert [f.read_bytes() for f in spooled.files] == [f.read_bytes() for f in in_memory.files]
    assert spooled.checksum == in_memory.checksum
    assert read_dataset_rows(tmp_path / "b") == [row.model_dump() for row in rows]


def test_big_files_are_written_a_row_group_at_a_time_as_pyarrow_writes_the_whole_table(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import flows.publishing.parquet as parquet

    rows = make_rows(5000)
    spool = RowSpool(tmp_path / "spool", {"rows": Row})
    for index, start in enumerate(range(0, 5000, 700)):  # shards that do not line up with anything
        spool.add(index, {"rows": rows[start : start + 700]})
    table = pa.Table.from_pylist([row.model_dump() for row in rows], schema=features_for(Row).arrow_schema)
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", table.nbytes * 2 // 5)  # row groups of ~2,000 rows

    parts = spool.rows("rows").parts
    read, writes = [], []
    watched = [parquet.TablePart(p.rows, p.nbytes, lambda p=p: read.append(p) or p.read()) for p in parts]

    class Writer(pq.ParquetWriter):
        def write_table(self, table, row_group_size=None):
            writes.append(len(read))  # parts read by the time each row group is written
            super().write_table(table, row_group_size)

    monkeypatch.setattr(parquet.pq, "ParquetWriter", Writer)
    spooled = publish_dataset(tmp_path / "b", parquet.CheckedTables(watched), features_for(Row), CARD)
    monkeypatch.undo()
    [file] = spooled.files
    groups = pq.ParquetFile(file).metadata
    size = groups.row_group(0).num_rows
    assert groups.num_row_groups == 3 and 1900 < size < 2100
    # a pass over the 8 parts sizes the row groups; then each row group is written as soon as
    # its rows were read: the parts of 700 rows it reaches into
    assert read[:8] == parts and writes == [8 + -(-min(5000, end) // 700) for end in (size, 2 * size, 3 * size)]
    expected = tmp_path / "whole.parquet"
    with pq.ParquetWriter(expected, table.schema, compression="zstd") as writer:
        writer.write_table(table, row_group_size=groups.row_group(0).num_rows)
    assert file.read_bytes() == expected.read_bytes()
    assert read_dataset_rows(tmp_path / "b") == [row.model_dump() for row in rows]


def test_the_same_rows_give_the_same_files_however_they_were_sharded(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import flows.publishing.parquet as parquet

    rows = make_rows(3000)
    for row in rows[1500:]:  # rows of two sizes: a share of a shard's bytes is not a share of its rows
        row.messages = [row.messages[0], {"role": "assistant", "content": row.messages[1]["content"] * 200}]
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 60_000)
    folders = {"in memory": publish_dataset(tmp_path / "memory", rows, features_for(Row), CARD, rows_per_file=1000)}
    for shard_size in (700, 300):
        spool = RowSpool(tmp_path / f"spool-{shard_size}", {"rows": Row})
        for index, start in enumerate(range(0, 3000, shard_size)):
            spool.add(index, {"rows": rows[start : start + shard_size]})
        folders[f"shards of {shard_size}"] = publish_dataset(tmp_path / f"spooled-{shard_size}", spool.rows("rows"),
                                                             features_for(Row), CARD, rows_per_file=1000)
    contents = {how: [f.read_bytes() for f in published.files] for how, published in folders.items()}
    assert contents["shards of 700"] == contents["in memory"] == contents["shards of 300"]
    groups = [pq.ParquetFile(f).metadata.num_row_groups for f in folders["in memory"].files]
    assert len(groups) == 3 and groups[0] > 1 and groups[2] > groups[0]  # several groups, fewer long rows each


def test_a_bad_row_is_refused_naming_the_dataset_shard_and_row(tmp_path):
    spool = RowSpool(tmp_path / "spool", {"rows": Row})
    good = make_rows(3)[0].model_dump()
    with pytest.raises(ValueError, match=r"rows of shard 4: row 1: missing key 'score'"):
        spool.add(4, {"rows": [good, {k: v for k, v in good.items() if k != "score"}]})
    assert spool.rows("rows").num_rows == 0


@pytest.mark.usefixtures("prefect_harness")
def test_the_summary_of_a_spooled_run_is_that_of_its_published_rows(tmp_path):
    import asyncio

    from flows.dualdistill import dualdistill

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)  # 12 problems in 4 shards
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        summary = asyncio.run(dualdistill(str(recipe)))
    out = tmp_path / "out"
    again = summarise(
        summary["run_name"], 12,
        [GradedTrajectory(**r) for r in read_dataset_rows(out / "trajectories")],
        [Composite(**r) for r in read_dataset_rows(out / "composites")],
        [Rejected(**r) for r in read_dataset_rows(out / "rejected")],
    ).to_dict()
    for figure in ("cases", "teachers", "composites", "rejected"):
        assert summary[figure] == again[figure], figure
    assert not (out / ".distillery" / "spool").exists()  # removed once published
    assert json.loads((out / ".distillery" / "summary.json").read_text())["composites"] == summary["composites"]


def test_the_spool_and_problems_stay_on_this_machine_when_state_is_pushed_to_a_url(tmp_path):
    from flows.publishing.storage import _files

    state = tmp_path / ".distillery"
    for name in ("journal/a.jsonl", "journal.index/a.idx", "spool/composites/00000.arrow", "problems/0a1b.jsonl",
                 "run-token"):
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).write_text("x")
    assert sorted(p.relative_to(state).as_posix() for p in _files(state)) == ["journal/a.jsonl", "run-token"]
