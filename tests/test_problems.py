from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.inputs.problem_shards as problem_shards_module
from flows.inputs.problem_shards import load_problems, problem_shards
from flows.inputs.problems import ProblemSourceError, arithmetic_problems, stable_id
from schemas.recipe import ColumnMap, ProblemsSpec


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_with_column_mapping_and_derived_ids(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1?", "final": 2}, {"question": "2+2?", "final": "4"}])
    problems = load_problems(ProblemsSpec(source=str(path), columns=ColumnMap(problem="question", answer="final")))
    assert [(p.problem, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4")]
    assert problems[0].id == stable_id("1+1?") and problems[1].source_row == 1


def test_parquet_with_id_column_limit_and_shuffle(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [{"id": f"q{i}", "problem": f"{i}+1?", "answer": str(i + 1)} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    spec = ProblemsSpec(source=str(path), limit=3, columns=ColumnMap(id="id"))
    assert [p.id for p in load_problems(spec)] == ["q0", "q1", "q2"]
    shuffled = load_problems(spec.model_copy(update={"shuffle": True, "seed": 1}))
    assert len(shuffled) == 3 and [p.id for p in shuffled] != ["q0", "q1", "q2"]
    assert shuffled == load_problems(spec.model_copy(update={"shuffle": True, "seed": 1}))


def test_dataset_folder_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"problem": "3*3?", "answer": "9"}]).save_to_disk(str(tmp_path / "ds"))
    problems = load_problems(ProblemsSpec(source=str(tmp_path / "ds")))
    assert [(p.problem, p.answer) for p in problems] == [("3*3?", "9")]


def test_missing_column_names_file_row_and_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "solution": "2"}])
    with pytest.raises(ProblemSourceError, match=r"p\.jsonl row 1: missing column 'answer' \(columns there: problem, solution\)"):
        load_problems(ProblemsSpec(source=str(path)))


def test_empty_answer_and_bad_json_name_the_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "  "}])
    with pytest.raises(ProblemSourceError, match=r"row 1: empty answer in column 'answer'"):
        load_problems(ProblemsSpec(source=str(path)))
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ProblemSourceError, match=r"row 1 \(line 2\): not valid JSON"):
        load_problems(ProblemsSpec(source=str(path)))


def test_duplicates_dropped_conflicting_ids_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "a", "answer": "1"}])
    assert len(load_problems(ProblemsSpec(source=str(path)))) == 1
    path = write_jsonl(tmp_path / "q.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "a", "answer": "2"}])
    with pytest.raises(ProblemSourceError, match="already used by row 0"):
        load_problems(ProblemsSpec(source=str(path)))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ProblemSourceError, match="not found"):
        load_problems(ProblemsSpec(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(ProblemSourceError, match="unsupported problem file"):
        load_problems(ProblemsSpec(source=str(tmp_path / "p.csv")))


def test_arithmetic_generator_is_seeded_distinct_and_correct():
    problems = arithmetic_problems(200, seed=5)
    assert problems == arithmetic_problems(200, seed=5)
    assert len({p.id for p in problems}) == 200
    assert problems != arithmetic_problems(200, seed=6)
    assert all(p.answer.lstrip("-").isdigit() for p in problems)
    first = next(p for p in problems if "gets" in p.problem)
    numbers = [int(w) for w in first.problem.split() if w.isdigit()]
    assert int(first.answer) == sum(numbers)


def _rows(count):
    return [{"id": f"q{i}", "problem": f"{i}+1?", "answer": str(i + 1)} for i in range(count)]


def test_run_problems_are_read_a_shard_at_a_time_in_the_order_a_list_had(tmp_path):
    rows = _rows(23)
    rows.insert(9, dict(rows[4]))  # an exact repeat: dropped
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = ProblemsSpec(source=str(path), columns=ColumnMap(id="id"), shuffle=True, seed=3, limit=20)
    shards = problem_shards(spec, 6, tmp_path / "state")
    # the order earlier versions had: every problem in memory, repeats dropped, shuffled, cut
    expected = [f"q{i}" for i in range(23)]
    random.Random(3).shuffle(expected)
    assert (shards.count, len(shards), [shards.size(i) for i in range(4)]) == (20, 4, [6, 6, 6, 2])
    assert [p.id for i in range(len(shards)) for p in shards.read(i)] == expected[:20]
    assert shards.read(3)[0].source_row == int(expected[18][1:]) + (int(expected[18][1:]) >= 9)
    with pytest.raises(TypeError):
        iter(shards)  # a run reads each shard when it starts it, never all of them up front
    with pytest.raises(IndexError):
        shards.read(4)


def test_duplicates_are_told_apart_by_id_when_their_hashes_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(problem_shards_module, "_hash", lambda text: 7)  # every id meets every other
    rows = _rows(5) + [_rows(5)[2]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [p.id for p in load_problems(ProblemsSpec(source=str(path), columns=ColumnMap(id="id")))] == [
        "q0", "q1", "q2", "q3", "q4"]
    rows[1]["answer"] = "x"
    rows += [{"id": "q1", "problem": "1+1?", "answer": "2"}, {"id": "q3", "problem": "other", "answer": "4"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(ProblemSourceError, match=r"q\.jsonl row 6: id 'q1' already used by row 1"):
        load_problems(ProblemsSpec(source=str(path), columns=ColumnMap(id="id")))


def test_builtin_problems_are_used_in_the_order_they_were_drawn(tmp_path):
    spec = ProblemsSpec(source="builtin:arithmetic", limit=20, shuffle=True, seed=3)
    drawn = [p.id for p in arithmetic_problems(20, seed=3)]
    shards = problem_shards(spec, 6, tmp_path / "state")
    assert [p.id for i in range(len(shards)) for p in shards.read(i)] == drawn == [p.id for p in load_problems(spec)]


def test_a_run_reads_the_problems_it_wrote_after_a_later_run_replaces_the_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _rows(12))
    spec = ProblemsSpec(source=str(path), columns=ColumnMap(id="id"))
    running = problem_shards(spec, 5, tmp_path / "state")
    write_jsonl(path, [{"id": f"new{i}", "problem": f"{i}*2?", "answer": str(2 * i)} for i in range(12)])
    later = problem_shards(spec, 5, tmp_path / "state")  # same settings: the same file name, rewritten
    assert [p.id for p in later.read(0)] == [f"new{i}" for i in range(5)]
    assert [p.id for p in running.read(1)] == [f"q{i}" for i in range(5, 10)]
    other = problem_shards(spec.model_copy(update={"limit": 4}), 5, tmp_path / "state")
    assert sorted((tmp_path / "state").iterdir()) == [other.path]  # the other settings' file is gone...
    assert [p.id for p in running.read(2)] == ["q10", "q11"] and later.read(0)[0].id == "new0"  # ...not for them
