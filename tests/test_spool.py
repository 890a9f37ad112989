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
