"""`decontaminate:` in the flows: planted copies of benchmark items are set aside before any
request, listed in `contaminated/`, counted in the summary, the card and `distillery check`;
a rerun with it turned on sends nothing new."""

from __future__ import annotations

import asyncio
import json

import datasets
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply, problem_text, teacher_role
from flow_helpers import write_recipe
from typer.testing import CliRunner

from flows.cli import app
from flows.dualdistill import dualdistill
from flows.self_distill import self_distill

pytestmark = pytest.mark.usefixtures("prefect_harness")

BENCHMARK = [  # MATH-500-like: a question and an id column, no answer column
    "A farmer has 17 sheep and buys 5 more at the Saturday market near the old mill. How many sheep does the "
    "farmer have now?",
    "Triangle ABC has sides of length 5, 12 and 13 centimeters. What is the area of the triangle, in square "
    "centimeters?",
    "Find the smallest positive integer n such that n squared leaves a remainder of 1 when divided by 24 and n is "
    "greater than 1.",
    "Compute 7 times 8.",
    "What is the sum of all positive divisors of 348?",
]
CLEAN = {
    "c0": ("What is the sum of all integers from 1 to 348?", "60726"),  # opens like item 4
    "c1": ("Ben has 4 bags with 6 apples each. Compute 7 times 8 and add the number of apples Ben has.", "80"),
    "c2": ("A train travels 120 miles at 40 miles per hour. How many hours does the trip take?", "3"),
    "c3": ("How many positive divisors does 36 have?", "9"),
    "c4": ("A farmer has 12 cows and buys 3 more at the market. How many cows are there now?", "15"),  # like item 0
    "c5": ("Find the smallest positive integer greater than 1 that leaves remainder 1 when divided by 2, 3 and 4.",
           "13"),
}
PLANTED = {  # id: (text, answer, benchmark row, method)
    "x-case": (BENCHMARK[0].upper().replace(",", "").replace(".", " ;").replace("?", " ?!"), "22", 0, "ngram"),
    "x-wrap": ("Solve this and explain each step please. " + BENCHMARK[1] + " Give the answer as a whole number.",
               "30", 1, "ngram"),
    "x-number": (BENCHMARK[2].replace("24", "48"), "7", 2, "ngram"),
    "x-short": ("compute 7   TIMES 8!!", "56", 3, "fuzzy"),
}


def write_inputs(tmp_path) -> list[dict]:
    """The problems (planted copies among the clean ones) and the benchmark file."""
    rows = [{"id": pid, "problem": text, "answer": answer} for pid, (text, answer) in CLEAN.items()]
    for position, (pid, (text, answer, _, _)) in zip((1, 3, 5, 8), PLANTED.items()):
        rows.insert(position, {"id": pid, "problem": text, "answer": answer})
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "math500.jsonl").write_text("".join(
        json.dumps({"question": text, "unique_id": f"test/{row}.json"}) + "\n" for row, text in enumerate(BENCHMARK)))
    return rows


def decontaminate(tmp_path) -> dict:
    return {"against": [{"source": str(tmp_path / "math500.jsonl"), "name": "MATH-500",
                         "columns": {"problem": "question", "id": "unique_id"}}], "ngram": 8, "fuzzy": 95}


class RightAnswers:
    """Both teachers (and a student) answer every problem right, without code."""

    def __init__(self, rows: list[dict]) -> None:
        self.answers = {r["problem"]: r["answer"] for r in rows}

    def __call__(self, body: dict) -> Reply:
        value = self.answers[problem_text(body, list(self.answers))]
        if teacher_role(body) == "tool" and not body["model"].startswith("student"):
            return Reply(content=f"No code needed.\n<answer>\\boxed{{{value}}}</answer>")
        return Reply(content=f"It is {value}.\n<answer>\\boxed{{{value}}}</answer>", reasoning_content="Known.")


def asked_about(server) -> set[str]:
    """The problems (clean or planted) that requests were about (prompts hold worked examples too)."""
    problems = {text for text, _ in CLEAN.values()} | {text for text, *_ in PLANTED.values()}
    return {m["content"] for r in server.requests for m in r["messages"] if m["role"] == "user"} & problems


def composites(folder) -> list[dict]:
    rows = datasets.load_dataset(str(folder), split="train")
    return sorted((dict(r) for r in rows), key=lambda r: (r["id"], r["first_teacher"]))


def test_dualdistill_sets_aside_exactly_the_planted_copies(tmp_path):
    rows = write_inputs(tmp_path)
    planted_texts = {text for text, *_ in PLANTED.values()}
    with FakeOpenAIServer(RightAnswers(rows)) as server:
        clean_recipe = write_recipe(tmp_path / "clean.yaml", tmp_path / "problems.jsonl", server.base_url,
                                    tmp_path / "out-a", decontaminate=decontaminate(tmp_path))
        summary = asyncio.run(dualdistill(str(clean_recipe)))
        assert asked_about(server) == {text for text, _ in CLEAN.values()}  # no teacher saw a planted copy
        assert not asked_about(server) & planted_texts
        sent_clean = len(server.requests)

        plain_recipe = write_recipe(tmp_path / "plain.yaml", tmp_path / "problems.jsonl", server.base_url,
                                    tmp_path / "out-b")
        plain = asyncio.run(dualdistill(str(plain_recipe)))
        assert len(server.requests) - sent_clean == sent_clean * len(rows) // len(CLEAN)
        plain_composites = composites(tmp_path / "out-b" / "composites")

        # the same output folder rerun with decontamination on: every answer comes from the journal
        rerun_recipe = write_recipe(tmp_path / "rerun.yaml", tmp_path / "problems.jsonl", server.base_url,
                                    tmp_path / "out-b", decontaminate=decontaminate(tmp_path))
        before = len(server.requests)
        rerun = asyncio.run(dualdistill(str(rerun_recipe)))
        assert len(server.requests) == before and sum(rerun["sent_this_run"].values()) == 0

    assert (summary["problems"], summary["contaminated"]) == (len(CLEAN), {"MATH-500": len(PLANTED)})
    assert (plain["problems"], plain["contaminated"]) == (len(rows), {})
    assert rerun["contaminated"] == summary["contaminated"]

    contaminated = datasets.load_dataset(str(tmp_path / "out-a" / "contaminated"))["train"]
    got = {r["id"]: r for r in contaminated}
    assert sorted(got) == sorted(PLANTED)
    for pid, (text, _, row, method) in PLANTED.items():
        record = got[pid]
        assert (record["problem"], record["benchmark"], record["benchmark_row"], record["benchmark_id"],
                record["benchmark_problem"], record["method"]) == (text, "MATH-500", row, f"test/{row}.json",
                                                                   BENCHMARK[row], method)
        assert record["score"] >= (95 if method == "fuzzy" else 50)
    assert {r["id"] for r in plain_composites} == {r["id"] for r in rows}
    assert composites(tmp_path / "out-a" / "composites") == [r for r in plain_composites if r["id"] not in PLANTED]
    assert composites(tmp_path / "out-b" / "composites") == composites(tmp_path / "out-a" / "composites")

    card = (tmp_path / "out-a" / "composites" / "README.md").read_text()
    assert "## Decontamination" in card and "| MATH-500 | 4 |" in card
    saved = json.loads((tmp_path / "out-a" / ".distillery" / "summary.json").read_text())
    assert saved["contaminated"] == {"MATH-500": 4} and saved["datasets"]["contaminated"].endswith("contaminated")


def test_check_counts_per_benchmark_without_a_model_call(tmp_path):
    rows = write_inputs(tmp_path)
    with FakeOpenAIServer(RightAnswers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              decontaminate=decontaminate(tmp_path))
        result = CliRunner().invoke(app, ["check", str(recipe)])
        assert server.requests == []
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["problems"], report["contaminated"]) == (len(CLEAN), {"MATH-500": len(PLANTED)})


def test_self_distill_sets_aside_the_planted_copies_too(tmp_path):
    rows = write_inputs(tmp_path)
    role = {"max_concurrency": 4, "max_retries": 0, "timeout_s": 10,
            "sampling": {"temperature": 0.6, "max_tokens": 64, "seed": 7}}
    with FakeOpenAIServer(RightAnswers(rows)) as server:
        role["base_url"] = server.base_url
        recipe = tmp_path / "sd.yaml"
        recipe.write_text(yaml.safe_dump({
            "run_name": "sd-decontaminate", "output_dir": str(tmp_path / "out"),
            "problems": {"source": str(tmp_path / "problems.jsonl"), "columns": {"id": "id"}},
            "student": {**role, "model": "student-0", "logprobs": False},
            "teachers": {"tool": {**role, "model": "teacher-tool"}, "reasoning": {**role, "model": "teacher-r"}},
            "self_distill": {"k": 2}, "sandbox": {"kind": "process"}, "shard_size": 4,
            "decontaminate": decontaminate(tmp_path),
        }))
        result = asyncio.run(self_distill(str(recipe)))
        assert not asked_about(server) & {text for text, *_ in PLANTED.values()}
        assert asked_about(server) == {text for text, _ in CLEAN.values()}

    assert result["rounds"][0]["problems"] == len(CLEAN)
    assert result["contaminated"] == {"MATH-500": len(PLANTED)}
    contaminated = datasets.load_dataset(str(tmp_path / "out" / "self_distill" / "contaminated"))["train"]
    assert sorted(contaminated["id"]) == sorted(PLANTED)
