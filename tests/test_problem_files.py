"""Problem files that cannot be used are named to the line: bytes that are not UTF-8, one id
on two different rows, a source with no row. The same one-line error from the reader, from
`distillery check` (calling no model) and in a Prefect run's failure message."""

from __future__ import annotations

import asyncio
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply
from flow_helpers import write_recipe
from typer.testing import CliRunner

import flows.inputs.problems as problems_module
from flows.cli import app
from flows.inputs.problem_shards import load_problems
from flows.inputs.problems import ProblemSourceError, read_problems
from schemas.recipe import ColumnMap, ProblemsSpec

BY_ID = ColumnMap(id="id")


def row(i, problem=None, answer=None) -> dict:
    return {"id": f"q{i}", "problem": problem or f"What is {i} + 1?", "answer": answer or str(i + 1)}


def jsonl_bytes(*lines: dict | bytes) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def write_parquet(path, columns: dict, schema=None):
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def not_utf8_strings(*values: bytes) -> pa.Array:
    """A string column holding bytes that are not UTF-8, as a careless writer leaves it."""
    return pa.array(values, type=pa.binary()).view(pa.string())


def error_of(source, columns=BY_ID) -> str:
    with pytest.raises(ProblemSourceError) as raised:
        load_problems(ProblemsSpec(source=str(source), columns=columns))
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- bytes that are not UTF-8 -------------------------------------------------

def test_jsonl_bytes_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(1)) + b'{"id": "q2", "problem": "caf\xe9?", "answer": "1"}\n'
                     + jsonl_bytes(row(3)))
    message = error_of(path)
    assert message == (f"{path} row 2 (line 3): not valid UTF-8 (0xe9 is byte 29 of the line); save it as UTF-8")


def test_the_line_counts_blank_lines_and_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(row(0)) + b"\n" + b'{"problem": "\xff", "answer": "1"}\n')
    assert error_of(path).startswith(f"{path} row 1 (line 3): not valid UTF-8")
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(row(0), row(1)))
    assert [p.id for p in load_problems(ProblemsSpec(source=str(path), columns=BY_ID))] == ["q0", "q1"]


def test_a_json_escape_utf8_cannot_hold_names_the_row_and_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0)) + b'{"id": "q1", "problem": "x \\udcff", "answer": "1"}\n')
    assert error_of(path) == f"{path} row 1: column 'problem' is not valid UTF-8 (surrogates not allowed)"


def test_parquet_text_not_utf8_names_the_file_row_and_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {
        "id": ["q0", "q1", "q2"], "problem": not_utf8_strings(b"1+1?", b"2+2?", b"caf\xe9?"), "answer": ["2", "4", "1"]})
    assert error_of(path) == (f"{path} row 2: column 'problem' is not valid UTF-8 (0xe9 is byte 4 of the value); "
                              "save it as UTF-8")


def test_parquet_binary_column_not_utf8_names_the_row_and_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"problem": pa.array([b"1+1?", b"\xff"]), "answer": ["2", "1"]})
    assert error_of(path, ColumnMap()) == (f"{path} row 1: column 'problem' is not valid UTF-8 (0xff is byte 1 of the "
                                           "value); save it as UTF-8")


def test_dataset_folder_bytes_not_utf8_name_the_folder_row_and_column(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl_bytes(row(0)) + b'{"id": "q1", "problem": "\xff", "answer": "1"}\n')
    assert error_of(folder).startswith(f"{folder} row 1: column 'problem' is not valid UTF-8")


def test_a_file_that_is_not_parquet_is_one_line_naming_it(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not parquet at all")
    assert error_of(path).startswith(f"{path} row 0: cannot read the Parquet file: ")


# --- one id, two problems ----------------------------------------------------

def test_one_id_with_two_problems_names_both_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(1), row(2), row(3), row(1, answer="3")))
    assert error_of(path) == (f"{path} row 4: id 'q1' already used by row 1 with a different problem or answer "
                              "(line 2 and line 5)")


def test_the_first_clash_in_file_order_is_named_and_blank_lines_count(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(1)) + b"\n" + jsonl_bytes(row(1, problem="Other?"), row(0, answer="9")))
    assert error_of(path) == (f"{path} row 2: id 'q1' already used by row 1 with a different problem or answer "
                              "(line 2 and line 4)")


def test_derived_ids_clash_when_one_problem_has_two_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes({"problem": "2+2?", "answer": "4"}, {"problem": "1+1?", "answer": "2"},
                                 {"problem": " 2+2? ", "answer": "5"}))
    message = error_of(path, ColumnMap())
    assert message.startswith(f"{path} row 2: id 'p-") and message.endswith(
        "already used by row 0 with a different problem or answer (line 1 and line 3)")


def test_parquet_one_id_with_two_problems_names_both_rows(tmp_path):
    rows = [row(0), row(1), row(2), row(0, problem="Else?")]
    path = write_parquet(tmp_path / "p.parquet", {k: [r[k] for r in rows] for k in rows[0]})
    assert error_of(path) == f"{path} row 3: id 'q0' already used by row 0 with a different problem or answer"


def test_ids_whose_hashes_meet_are_told_apart_by_reading_the_rows_again(tmp_path, monkeypatch):
    def every_id_meets(self, problem):
        self.ids.append(7)
        self.contents.append(hash((problem.problem, problem.answer)))

    monkeypatch.setattr(problems_module._Fingerprints, "add", every_id_meets)
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(1), row(2), row(1)))
    assert [p.id for p in load_problems(ProblemsSpec(source=str(path), columns=BY_ID))] == ["q0", "q1", "q2"]
    path.write_bytes(jsonl_bytes(row(0), row(1), row(2), row(1), row(2, answer="0")))
    assert error_of(path) == (f"{path} row 4: id 'q2' already used by row 2 with a different problem or answer "
                              "(line 3 and line 5)")


def test_exact_repeats_are_dropped_as_documented(tmp_path):
    """`read_problems` yields every row; the run's loader drops a repeat of an earlier row."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(1), row(0), row(2), row(1)))
    spec = ProblemsSpec(source=str(path), columns=BY_ID)
    assert [p.id for p in read_problems(spec)] == ["q0", "q1", "q0", "q2", "q1"]
    assert [(p.id, p.source_row) for p in load_problems(spec)] == [("q0", 0), ("q1", 1), ("q2", 3)]


# --- no row at all -------------------------------------------------------------

def empty_sources(tmp_path) -> dict[str, tuple]:
    """Each kind of source with no problem in it, and what its error says."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\t\n")
    write_parquet(tmp_path / "empty.parquet", {"problem": [], "answer": []},
                  schema=pa.schema([("problem", pa.string()), ("answer", pa.string())]))
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "README.md").write_text("nothing here\n")
    import datasets

    datasets.Dataset.from_dict({"problem": [], "answer": []}).save_to_disk(str(tmp_path / "saved"))
    for folder, blank in (("blank_files", b""), ("blank_lines", b"\n\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_bytes(blank)
    (tmp_path / "no_rows").mkdir()
    shutil.copy(tmp_path / "empty.parquet", tmp_path / "no_rows" / "train.parquet")
    return {
        "empty.jsonl": "no problems in it (the file is empty)",
        "blank.jsonl": "no problems in it (the file has only blank lines)",
        "empty.parquet": "no problems in it (the file has 0 rows)",
        "no_data": "no problems in it (no data files: give .jsonl or .parquet files, or a dataset saved with "
                   "save_to_disk)",
        "saved": "no problems in it (the saved dataset has no data files)",
        "blank_files": "no problems in it (its data files are empty)",
        "blank_lines": "no problems in it (its data files are empty)",
        "no_rows": "cannot load split 'train': An error occurred while generating the dataset "
                   "(ArrowInvalid: BatchSize must be greater than 0, got 0)",
    }


def test_a_source_with_no_row_is_an_error_not_an_empty_run(tmp_path):
    for name, why in empty_sources(tmp_path).items():
        assert error_of(tmp_path / name, ColumnMap()) == f"{tmp_path / name}: {why}", name
        with pytest.raises(ProblemSourceError) as raised:  # the reader alone says so too
            list(read_problems(ProblemsSpec(source=str(tmp_path / name))))
        assert str(raised.value) == f"{tmp_path / name}: {why}"


def test_the_reader_alone_refuses_one_id_on_two_problems(tmp_path):
    """Other inputs (benchmark files) are read with `read_problems` without the run's loader."""
    path = tmp_path / "bench.jsonl"
    path.write_bytes(jsonl_bytes(row(0), row(0, problem="Else?")))
    with pytest.raises(ProblemSourceError, match=r"row 1: id 'q0' already used by row 0 .*\(line 1 and line 2\)"):
        list(read_problems(ProblemsSpec(source=str(path), columns=BY_ID)))


# --- `distillery check` and the flows ------------------------------------------

def bad_files(tmp_path) -> dict[str, str]:
    """A bad problem file of each kind, and what the one error line must say of it."""
    (tmp_path / "not_utf8.jsonl").write_bytes(jsonl_bytes(row(0), row(1)) + b'{"id": "q2", "problem": "\xff"}\n')
    (tmp_path / "clash.jsonl").write_bytes(jsonl_bytes(row(0), row(1), row(2), row(3), row(1, answer="7")))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    write_parquet(tmp_path / "not_utf8.parquet", {
        "id": ["q0", "q1"], "problem": not_utf8_strings(b"1+1?", b"\xff"), "answer": ["2", "1"]})
    return {
        "not_utf8.jsonl": "row 2 (line 3): not valid UTF-8",
        "clash.jsonl": "row 4: id 'q1' already used by row 1 with a different problem or answer (line 2 and line 5)",
        "empty.jsonl": "no problems in it (the file is empty)",
        "blank.jsonl": "no problems in it (the file has only blank lines)",
        "not_utf8.parquet": "row 1: column 'problem' is not valid UTF-8",
    }


def never_called(body: dict) -> Reply:
    raise AssertionError("a model was called")


def self_distill_recipe(path, problems, base_url) -> None:
    role = {"base_url": base_url, "max_retries": 0, "timeout_s": 5}
    path.write_text(yaml.safe_dump({
        "run_name": "sd", "output_dir": str(path.parent / "out-sd"),
        "problems": {"source": str(problems), "columns": {"id": "id"}},
        "student": {**role, "model": "student-0"},
        "teachers": {"tool": {**role, "model": "t"}, "reasoning": {**role, "model": "r"}},
        "self_distill": {"k": 2},
    }))


def test_check_prints_one_line_naming_file_and_line_and_calls_no_model(tmp_path):
    runner = CliRunner()
    with FakeOpenAIServer(never_called) as server:
        for name, says in bad_files(tmp_path).items():
            for job, write in (("dualdistill", write_recipe), ("self_distill", self_distill_recipe)):
                recipe = tmp_path / f"{job}.yaml"
                if job == "dualdistill":
                    write(recipe, tmp_path / name, server.base_url, tmp_path / "out")
                else:
                    write(recipe, tmp_path / name, server.base_url)
                result = runner.invoke(app, ["check", str(recipe)])
                assert result.exit_code == 1, (name, job, result.output)
                assert result.output.startswith(f"error: {tmp_path / name}") and says in result.output, result.output
                assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
        assert server.requests == []


@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_run_fails_with_the_same_line_before_any_model_call(tmp_path):
    from flows.dualdistill import dualdistill
    from flows.self_distill import self_distill

    bad = tmp_path / "not_utf8.jsonl"
    bad.write_bytes(jsonl_bytes(row(0), row(1)) + b'{"id": "q2", "problem": "\xff"}\n')
    with FakeOpenAIServer(never_called) as server:
        recipe = write_recipe(tmp_path / "dd.yaml", bad, server.base_url, tmp_path / "out")
        self_distill_recipe(tmp_path / "sd.yaml", bad, server.base_url)
        for flow, path in ((dualdistill, recipe), (self_distill, tmp_path / "sd.yaml")):
            state = asyncio.run(flow(str(path), return_state=True))
            assert state.is_failed()
            assert f"ProblemSourceError: {bad} row 2 (line 3): not valid UTF-8" in state.message, state.message
        assert server.requests == []
