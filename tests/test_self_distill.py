"""The self-distillation flow end to end against a loopback fake server (student + teachers)."""

from __future__ import annotations

import asyncio
import json
import logging
import typing

import datasets
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply, executor_turns, problem_text, teacher_role

from flows.self_distill import self_distill
from flows.teachers.students import STUDENT_BACKENDS, StudentBackendUnavailable, build_student
from schemas.recipe import JOB_SECTIONS, RecipeError, StudentBackend, StudentSpec, check_job, parse_recipe

K = 4
SEED = 7


def write_problems(path) -> list[dict]:
    """Problem i: K samples of which i are correct; odd problems are solved with code."""
    rows = [{"id": f"p{i}", "problem": f"[{i}] What is {20 + i} + {3 * i}?", "answer": str(20 + 4 * i)}
            for i in range(K + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


class ScriptedStudent:
    """The student (model `student-*`) answers sample s of problem i right iff s < i; the
    tool teacher and the reasoning teacher always answer right, except the reasoning
    teacher on `wrong_reasoning` problems."""

    def __init__(self, rows: list[dict], wrong_reasoning: set[str] = frozenset(), ignore_seed: bool = False):
        self.rows = {r["problem"]: r for r in rows}
        self.wrong_reasoning = wrong_reasoning
        self.ignore_seed = ignore_seed

    def __call__(self, body: dict) -> Reply:
        text = problem_text(body, list(self.rows))
        row = self.rows[text]
        index = int(row["id"][1:])
        answer = int(row["answer"])
        if body["model"].startswith("student"):
            sample = 0 if self.ignore_seed else body["seed"] - SEED
            value = answer if sample < index else answer + 1
            if index % 2 and executor_turns(body, text) == 0:
                return Reply(content=f"Let me compute.\n<code>\nprint({value})\n")
            return Reply(content=f"It is {value}.\n<answer>\\boxed{{{value}}}</answer>")
        if teacher_role(body) == "tool":
            if executor_turns(body, text) == 0:
                return Reply(content=f"<code>\nprint({answer})\n")
            return Reply(content=f"Printed.\n<answer>\\boxed{{{answer}}}</answer>")
        value = answer + 1 if row["id"] in self.wrong_reasoning else answer
        return Reply(content=f"<answer>\\boxed{{{value}}}</answer>", reasoning_content="Adding.")


def write_recipe(path, problems, base_url, output_dir, **self_distill):
    role = {"base_url": base_url, "max_concurrency": 4, "max_retries": 0, "timeout_s": 10,
            "sampling": {"temperature": 0.6, "max_tokens": 64, "seed": SEED}}
    recipe = {
        "run_name": "sd-test",
        "output_dir": str(output_dir),
        "problems": {"source": str(problems), "columns": {"id": "id"}},
        "student": {**role, "model": "student-0", "logprobs": False},
        "teachers": {"tool": {**role, "model": "teacher-tool"}, "reasoning": {**role, "model": "teacher-reasoning"}},
        "self_distill": {"k": K, "beta1": 0.0, "beta2": 0.9, "pick": "random", **self_distill},
        "sandbox": {"kind": "process", "wall_time_s": 5},
        "shard_size": 3,
        "shard_retries": 0,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(recipe):
    return asyncio.run(self_distill(str(recipe)))


def load(folder):
    return datasets.load_dataset(str(folder), split="train")


pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_examples_follow_the_beta_rules(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl")
    with FakeOpenAIServer(ScriptedStudent(rows, wrong_reasoning={"p3"})) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        result = run(recipe)
        first_requests = len(server.requests)
        again = run(recipe)  # a finished round is not redone
        assert len(server.requests) == first_requests

    (summary,) = result["rounds"]
    assert (summary["problems"], summary["samples"]) == (K + 1, K * (K + 1))
    assert summary["pass_at_k"] == pytest.approx(4 / 5) and summary["mean_score"] == pytest.approx(0.5)
    assert again["rounds"][0]["examples"] == summary["examples"]

    out = tmp_path / "out" / "self_distill"
    examples = load(out / "round-1")
    kinds = sorted((e["id"], e["kind"]) for e in examples)
    # p0: 0/4 -> correction only; p1..p3: both; p4: 4/4 -> verification only. p3's samples ran
    # code, so both its picks need the reasoning teacher, who is wrong there: both are rejected
    assert kinds == [("p0", "correction"), ("p1", "correction"), ("p1", "verification"), ("p2", "correction"),
                     ("p2", "verification"), ("p4", "verification")]
    rejected = load(out / "round-1-rejected")
    assert sorted((r["id"], r["kind"]) for r in rejected) == [("p3", "correction"), ("p3", "verification")]
    assert all(r.startswith("the reasoning teacher's solution was wrong: not_equivalent") for r in rejected["reason"])

    by_key = {(e["id"], e["kind"]): e for e in examples}
    verification = by_key[("p1", "verification")]  # p1 ran code: verified by text reasoning
    assert (verification["student_strategy"], verification["teacher_strategy"]) == ("tool", "reasoning")
    assert verification["mask_until"] == 0 and verification["sample"] == 0  # the only correct sample
    assert verification["text"].startswith(verification["student_text"].replace("<answer>", "").replace("</answer>", ""))
    detail = verification["messages"][-1]["train_detail"]
    executor = verification["text"].index("<executor>")
    assert any(d["begin_offset"] == executor and not d["train"] for d in detail)
    correction = by_key[("p2", "correction")]  # p2 ran no code: corrected by the tool teacher
    assert (correction["student_strategy"], correction["teacher_strategy"]) == ("reasoning", "tool")
    assert correction["sample"] in (2, 3) and correction["mask_until"] > 0
    assert correction["messages"][-1]["train_detail"][0]["train"] is False
    assert correction["text"][correction["mask_until"]:].startswith("Wait, use text reasoning is too tedious")

    samples = load(out / "round-1-samples")
    assert len(samples) == K * (K + 1) and sorted(set(samples["sample"])) == list(range(K))
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["rounds"][0]["examples"] == {"verification": 3,
                                                                                       "correction": 3}


def test_duplicate_samples_are_reported(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl")
    with FakeOpenAIServer(ScriptedStudent(rows, ignore_seed=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        (summary,) = run(recipe)["rounds"]
    assert summary["problems_with_duplicates"] == K + 1 and summary["distinct_share"] == pytest.approx(1 / K)
    card = (tmp_path / "out" / "self_distill" / "round-1" / "README.md").read_text()
    assert "duplicate samples" in card.lower()
    assert f"path: {tmp_path / 'out' / 'self_distill' / 'round-1'}" in card and "distillery export" in card


def test_two_rounds_with_a_command_trainer(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl")
    script = tmp_path / "train.sh"
    calls = tmp_path / "calls.txt"
    script.write_text(f'echo "training on $1 (round $2, from $3)"\necho "$2" >> {calls}\necho "student-$2"\n')
    with FakeOpenAIServer(ScriptedStudent(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              rounds=2, trainer={"kind": "command", "command": f"bash {script} {{dataset}} {{round}} {{student}}"})
        result = run(recipe)
    first, second = result["rounds"]
    assert (first["student"], first["next_student"]) == ("student-0", "student-1")
    assert (second["student"], second["next_student"]) == ("student-1", "student-2")
    models = {body["model"] for body in server.requests}
    assert {"student-0", "student-1"} <= models and "student-2" not in models
    assert (tmp_path / "out" / "self_distill" / "round-2" / "README.md").exists()

    with FakeOpenAIServer(ScriptedStudent(rows)) as server:  # one more round: the first two are not redone
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              rounds=3, trainer={"kind": "command", "command": f"bash {script} {{dataset}} {{round}} {{student}}"})
        third = run(recipe)["rounds"][2]
    assert calls.read_text().split() == ["1", "2", "3"] and third["student"] == "student-2"
    assert {body["model"] for body in server.requests} == {"student-2"}  # teacher parts replay from the journal


def test_recipe_sections_per_job(tmp_path):
    base = {"run_name": "x", "output_dir": str(tmp_path)}
    with pytest.raises(RecipeError, match=r"the dualdistill job needs `problems:`, `teachers:`"):
        check_job(parse_recipe(base), "dualdistill")
    with pytest.raises(RecipeError, match=r"the self_distill job needs `problems:`, `student:`, `self_distill:`"):
        check_job(parse_recipe(base), "self_distill")
    with pytest.raises(RecipeError, match=r"self_distill: Value error, `rounds` > 1 needs a trainer"):
        parse_recipe({**base, "self_distill": {"rounds": 2}})
    with pytest.raises(RecipeError, match=r"`reuse_from`"):
        parse_recipe({**base, "self_distill": {"teacher_part": "reuse"}})
    with pytest.raises(RecipeError, match=r"`command` is required"):
        parse_recipe({**base, "self_distill": {"trainer": {"kind": "command"}}})
    with pytest.raises(RecipeError, match=r"student.*needs `model`"):
        parse_recipe({**base, "student": {"backend": "transformers"}})
    assert set(JOB_SECTIONS) == {"dualdistill", "self_distill", "leakage"}
    reuse = parse_recipe({**base, "problems": {"source": "builtin:arithmetic", "limit": 2},
                          "student": {"endpoint": "embedded"},
                          "self_distill": {"teacher_part": "reuse", "reuse_from": "out/t"}})
    assert check_job(reuse, "self_distill") is reuse  # no teachers needed to reuse


def test_every_student_backend_name_resolves(tmp_path):
    from flows.execution.sandbox import make_sandbox
    from flows.models.vllm_backend import vllm_available
    from flows.models.journal import RequestJournal

    assert set(STUDENT_BACKENDS) == set(typing.get_args(StudentBackend))
    journal = RequestJournal(tmp_path / "j")
    sandbox = make_sandbox("process")
    endpoint = build_student(StudentSpec(base_url="http://127.0.0.1:9/v1", model="m"), sandbox, journal, [])
    assert endpoint.client.model == "m" and endpoint.params["logprobs"] is True
    vllm_spec = StudentSpec(backend="vllm", model="some/checkpoint", engine_args={"dtype": "float32"})
    if vllm_available() is None:  # the vllm venv (make test-vllm): built, not started until a request
        client = build_student(vllm_spec, sandbox, journal, []).client
        assert client.engine is None and client.engine_args == {"dtype": "float32"}
    else:
        with pytest.raises(StudentBackendUnavailable, match="vllm serve"):
            build_student(vllm_spec, sandbox, journal, [])
    servers = []
    embedded = build_student(StudentSpec(endpoint="embedded"), sandbox, journal, servers)
    assert embedded.client.model.startswith("SmolLM2") and len(servers) == 1  # started lazily, not here


def test_a_failed_round_resumes_without_resending(tmp_path, caplog):
    rows = write_problems(tmp_path / "problems.jsonl")
    script = ScriptedStudent(rows)

    def flaky(body):  # the student's endpoint fails on p4's samples
        if body["model"].startswith("student") and "[4]" in problem_text(body, list(script.rows)):
            return Reply(status=500)
        return script(body)

    with FakeOpenAIServer(flaky) as broken:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", broken.base_url, tmp_path / "out")
        with pytest.raises(RuntimeError, match=r"round 1: 1 shard\(s\) failed.*rerun to resume"):
            run(recipe)
    answered = {json.dumps([b["model"], b["messages"], b.get("seed")]) for b in broken.requests
                if "[4]" not in problem_text(b, list(script.rows))}
    with FakeOpenAIServer(script) as healthy:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", healthy.base_url, tmp_path / "out")
        caplog.set_level(logging.INFO, logger="prefect.flow_runs")
        (summary,) = run(recipe)["rounds"]
    resent = {json.dumps([b["model"], b["messages"], b.get("seed")]) for b in healthy.requests} & answered
    assert resent == set() and summary["samples"] == K * (K + 1)
    said = [record.getMessage() for record in caplog.records]
    assert f"round 1, attempt 1: of {K * (K + 1)} student samples' first requests, {K * K} to replay and {K} to send" in said
