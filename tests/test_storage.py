"""`output_dir` as an S3 URL, against a moto S3 server on loopback (no network)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from moto_s3 import fresh_machines, moto_s3

from flows.publishing.storage import (
    OutputLocationError,
    check_output,
    output_location,
    pull_state,
    push_outputs,
    push_state,
    result_storage,
)
from schemas.recipe import Recipe

BUCKET = "distillery-test"


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture
def mirrors(tmp_path, monkeypatch):
    """Point the mirrors at a temporary folder; `fresh()` gives another machine's empty cache."""
    return fresh_machines(tmp_path, monkeypatch)


def url_recipe(prefix: str, bucket: str = BUCKET) -> Recipe:
    return Recipe(run_name="storage-test", output_dir=f"s3://{bucket}/{prefix}")


def remote_text(fs, path: str) -> str:
    fs.invalidate_cache()
    return fs.cat_file(f"{BUCKET}/{path}").decode()


def test_a_local_output_dir_needs_no_storage_but_keeps_its_prefect_results(tmp_path):
    recipe = Recipe(run_name="local", output_dir=str(tmp_path / "out"))
    for step in (check_output, pull_state, push_state, push_outputs):
        step(recipe)
    assert result_storage(recipe) == tmp_path / "out" / ".distillery" / "prefect-results"
    assert output_location(recipe, recipe.work_dir / "composites") == str(tmp_path / "out" / "composites")
    assert not (tmp_path / "out").exists()


def test_a_missing_bucket_is_named(s3, mirrors):
    recipe = url_recipe("run", bucket="no-such-bucket")
    with pytest.raises(OutputLocationError) as error:
        check_output(recipe)
    assert str(error.value).startswith("output_dir s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist")


def test_a_writable_bucket_passes_and_keeps_no_probe(s3, mirrors):
    check_output(url_recipe("checked"))
    s3.invalidate_cache()
    assert s3.find(f"{BUCKET}/checked") == []


def test_a_missing_package_says_what_to_install(monkeypatch):
    def no_s3fs(url, **options):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3fs)
    with pytest.raises(OutputLocationError, match=r"output_dir s3://b/run: install distillery\[s3\] \(s3fs\)"):
        check_output(url_recipe("run", bucket="b"))


def test_state_round_trip_merges_journals_and_skips_results(s3, mirrors):
    first = url_recipe("round-trip")
    journal = first.state_dir / "journal"
    journal.mkdir(parents=True)
    (first.state_dir / "run-token").write_text("token-1")
    (journal / "tool-shard-00000.jsonl").write_text("a\nb\nc\nhalf-writ")  # a line being written
    (journal / "reasoning-shard-00000.jsonl").write_text("r1\n")
    (journal / "tool-shard-00001.jsonl").write_text("x1\nx2\n")
    push_state(first)
    assert remote_text(s3, "round-trip/.distillery/journal/tool-shard-00000.jsonl") == "a\nb\nc\n"
    assert remote_text(s3, "round-trip/.distillery/run-token") == "token-1"
    s3.pipe_file(f"{BUCKET}/round-trip/.distillery/prefect-results/some-key", b"{}")
    first_mirror = first.work_dir

    mirrors()  # another machine: shard 0's file is shorter there, shard 1's longer and diverged
    second = url_recipe("round-trip")
    assert second.work_dir != first_mirror
    journal = second.state_dir / "journal"
    journal.mkdir(parents=True)
    (journal / "reasoning-shard-00000.jsonl").write_text("r1\nr2\n")
    (journal / "tool-shard-00001.jsonl").write_text("x1\ny22\n")
    pull_state(second)
    assert (second.state_dir / "run-token").read_text() == "token-1"
    assert (journal / "tool-shard-00000.jsonl").read_text() == "a\nb\nc\n"
    assert (journal / "reasoning-shard-00000.jsonl").read_text() == "r1\nr2\n"  # the longer one, kept
    assert (journal / "tool-shard-00001.jsonl").read_text() == "x1\ny22\nx2\n"  # no line lost
    assert not (second.state_dir / "prefect-results").exists()

    push_state(second)  # only what differs from the URL goes up
    assert remote_text(s3, "round-trip/.distillery/journal/reasoning-shard-00000.jsonl") == "r1\nr2\n"
    assert remote_text(s3, "round-trip/.distillery/journal/tool-shard-00001.jsonl") == "x1\ny22\nx2\n"


def test_push_state_uploads_only_what_changed(s3, mirrors, monkeypatch):
    recipe = url_recipe("cheap")
    journal = recipe.state_dir / "journal"
    journal.mkdir(parents=True)
    for shard in range(3):
        (journal / f"tool-shard-{shard:05d}.jsonl").write_text("line\n")
    uploads = []
    real_pipe = s3.pipe
    monkeypatch.setattr(s3, "pipe", lambda contents: (uploads.append(sorted(contents)), real_pipe(contents)))
    push_state(recipe)
    push_state(recipe)
    with (journal / "tool-shard-00001.jsonl").open("a") as handle:
        handle.write("another\n")
    push_state(recipe)
    assert [len(batch) for batch in uploads] == [3, 1]
    assert uploads[1] == [f"{BUCKET}/cheap/.distillery/journal/tool-shard-00001.jsonl"]


def test_push_outputs_replaces_each_dataset_whole(s3, mirrors):
    recipe = url_recipe("outputs")
    data = recipe.work_dir / "composites" / "data"
    data.mkdir(parents=True)
    (data.parent / "manifest.json").write_text("{}")
    (data / "train-00000-of-00002.parquet").write_bytes(b"one")
    (data / "train-00001-of-00002.parquet").write_bytes(b"two")
    (recipe.work_dir / ".composites.tmp-1").mkdir()
    (recipe.work_dir / ".composites.tmp-1" / "half").write_text("staging")
    (recipe.state_dir).mkdir()
    (recipe.state_dir / "summary.json").write_text("{}")
    s3.pipe_file(f"{BUCKET}/outputs/.distillery/prefect-results/kept", b"{}")
    push_outputs(recipe)
    s3.invalidate_cache()
    assert sorted(s3.find(f"{BUCKET}/outputs")) == [f"{BUCKET}/outputs/{name}" for name in (
        ".distillery/prefect-results/kept", ".distillery/summary.json", "composites/data/train-00000-of-00002.parquet",
        "composites/data/train-00001-of-00002.parquet", "composites/manifest.json")]

    for stale in data.iterdir():  # republished as one file
        stale.unlink()
    (data / "train-00000-of-00001.parquet").write_bytes(b"all")
    push_outputs(recipe)
    s3.invalidate_cache()
    assert sorted(s3.find(f"{BUCKET}/outputs/composites")) == [
        f"{BUCKET}/outputs/composites/data/train-00000-of-00001.parquet", f"{BUCKET}/outputs/composites/manifest.json"]
    assert s3.exists(f"{BUCKET}/outputs/.distillery/prefect-results/kept")
    assert output_location(recipe, data.parent) == f"s3://{BUCKET}/outputs/composites"


CACHED_FLOW = """
import json, sys
from pathlib import Path
from prefect import flow, task
from flows.publishing.storage import result_storage
from schemas.recipe import Recipe

@task(persist_result=True, cache_key_fn=lambda context, parameters: parameters["key"])
def square(key: str, x: int, marker: str) -> int:
    with open(marker, "a") as handle:
        handle.write(f"{x}\\n")
    return x * x

@flow
def squares(output_dir: str, marker: str) -> list[int]:
    recipe = Recipe(run_name="cached", output_dir=output_dir)
    stage = square.with_options(result_storage=result_storage(recipe))
    return [stage(f"square-{x}", x, marker) for x in (2, 3)]
"""


@pytest.mark.slow  # two fresh Python processes
@pytest.mark.usefixtures("prefect_harness")
def test_stage_results_at_the_url_are_a_cache_hit_in_a_fresh_process(s3, mirrors, tmp_path):
    from prefect.settings import PREFECT_API_URL

    module = tmp_path / "cached_flow.py"
    module.write_text(CACHED_FLOW)
    marker = tmp_path / "computed.txt"
    run = f"from cached_flow import squares; print(squares('s3://{BUCKET}/cached', {str(marker)!r}))"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().endswith("[4, 9]")
    assert marker.read_text() == "2\n3\n"  # computed by the first process only
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in s3.find(f"{BUCKET}/cached/.distillery/prefect-results")) == [
        "square-2", "square-3"]


def read_remote_dataset(fs, url: str) -> list[dict]:
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    files = sorted(fs.glob(f"{url.removeprefix('s3://')}/data/*.parquet"))
    return sorted((row for path in files for row in pq.read_table(path, filesystem=fs).to_pylist()),
                  key=lambda row: row["id"])


@pytest.mark.slow  # three flow runs
@pytest.mark.usefixtures("prefect_harness")
def test_dualdistill_writes_to_s3_and_resumes_on_a_fresh_machine(s3, mirrors, tmp_path):
    from fake_openai import FakeOpenAIServer, Reply
    from flow_helpers import ScriptedTeachers, write_problems, write_recipe

    from flows.dualdistill import dualdistill

    url = f"s3://{BUCKET}/flow"
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, url)
        summary = asyncio.run(dualdistill(str(recipe)))
    assert len(server.requests) == 8 * 2 + 8
    assert summary["datasets"] == {name: f"{url}/{name}" for name in ("composites", "trajectories", "rejected")}
    composites = read_remote_dataset(s3, f"{url}/composites")
    assert len(composites) == 6 and summary["composites"] == 6
    assert json.loads(remote_text(s3, "flow/.distillery/summary.json"))["datasets"] == summary["datasets"]

    from typer.testing import CliRunner

    from flows.cli import app

    status = CliRunner().invoke(app, ["status", url, "--json"])  # read from the URL, as from another machine
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["progress"]["state"] == "completed"
    assert {s["name"]: s["done"] for s in report["progress"]["stages"]} == {
        "answer[tool]": 8, "answer[reasoning]": 8, "grade": 16}
    assert report["journal"]["tool"]["answers"] == 16 and report["journal"]["reasoning"]["answers"] == 8

    # another machine (an empty mirror): the stage results come back from the URL
    mirrors()
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, url)
        again = asyncio.run(dualdistill(str(recipe)))
    assert dead.requests == [] and again["cases"] == summary["cases"]
    assert again["teachers"]["tool"]["replayed_requests"] == 0  # cache hits: the teachers were not even asked
    assert read_remote_dataset(s3, f"{url}/composites") == composites

    # and one more without cached stage results: every answer comes from the journal at the URL
    mirrors()
    s3.rm(f"{BUCKET}/flow/.distillery/prefect-results", recursive=True)
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, url)
        replayed = asyncio.run(dualdistill(str(recipe)))
    assert dead.requests == [] and replayed["cases"] == summary["cases"]
    assert replayed["teachers"]["tool"]["replayed_requests"] == 16
    assert read_remote_dataset(s3, f"{url}/composites") == composites


@pytest.mark.usefixtures("prefect_harness")
def test_dualdistill_with_a_missing_bucket_fails_before_any_request(s3, mirrors, tmp_path):
    from fake_openai import FakeOpenAIServer, Reply
    from flow_helpers import write_problems, write_recipe

    from flows.dualdistill import dualdistill

    write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(lambda body: Reply(content="x")) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url,
                              "s3://no-such-bucket/run")
        with pytest.raises(OutputLocationError, match=r"output_dir s3://no-such-bucket/run: bucket 'no-such-bucket'"):
            asyncio.run(dualdistill(str(recipe)))
    assert server.requests == []
