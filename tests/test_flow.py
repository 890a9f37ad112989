"""The DualDistill flow end to end against a loopback fake OpenAI server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import datasets
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply, problem_text, teacher_role
from flow_helpers import ScriptedTeachers, write_problems, write_recipe
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

from flows.dualdistill import dualdistill
from flows.orchestration.runs import RunFailed

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(recipe_path):
    return asyncio.run(dualdistill(str(recipe_path)))


def load(folder):
    return datasets.load_dataset(str(folder), split="train")


def prefect_default_results() -> set[str]:
    folder = PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()
    return set(os.listdir(folder)) if folder.exists() else set()


def sent_keys(server) -> list[str]:
    return [json.dumps([r["model"], r["messages"], r.get("seed")], sort_keys=True) for r in server.requests]


def test_all_four_cases_exact_counts_and_text(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        summary = run(recipe)

    assert summary["cases"] == {"both_correct": 2, "first_correct": 2, "second_corrects": 2, "both_wrong": 2}
    assert summary["teachers"]["tool"]["correct"] == 4 and summary["teachers"]["reasoning"]["correct"] == 4
    assert summary["teachers"]["tool"]["tool_calls"] == 8
    assert len(server.requests) == 8 * 2 + 8  # tool: code turn + answer turn; reasoning: one

    composites = load(tmp_path / "out" / "composites")
    assert composites.features["messages"].feature["role"].dtype == "string"
    by_id = {r["id"]: r for r in composites}
    assert sorted(by_id) == sorted(r["id"] for r in rows if not r["id"].startswith("both_wrong"))

    both = by_id["both_correct-0"]
    assert both["case"] == "both_correct" and both["first_teacher"] == "tool" and both["mask_until"] == 0
    assert both["text"] == (
        "Compute it.\n<code>\nprint(100 + 7)\n</code>\n<executor>\n107\n</executor>\n"
        "The code printed 107.\n\\boxed{107}\n\n"
        "Wait, we can also use text-reasoning as an alternative way to verify the solution.\n\n"
        "<think>\n100 plus 7 is 107.\n</think>\n<answer>\\boxed{107}</answer>"
    )
    assert [(m["role"], m["content"]) for m in both["messages"]] == [("user", rows[0]["problem"]),
                                                                     ("assistant", both["text"])]
    assert both["messages"][0]["train_detail"] is None
    executor_at = both["text"].index("<executor>")
    assert [(d["begin_offset"], d["train"]) for d in both["messages"][1]["train_detail"]] == [
        (0, True), (executor_at, False), (executor_at + len("<executor>\n107\n</executor>"), True)]
    first_only = by_id["tool_only-1"]
    assert first_only["case"] == "first_correct" and (first_only["g1"], first_only["g2"]) == (True, False)
    assert first_only["text"].endswith("<answer>\\boxed{115}</answer>") and "<think>" not in first_only["text"]
    corrected = by_id["reasoning_only-0"]
    assert corrected["case"] == "second_corrects"
    assert corrected["text"][corrected["mask_until"]:].startswith("Wait, the code is not correct, let's try text reasoning.")
    assert "print(100 - 7)" in corrected["text"][: corrected["mask_until"]]

    rejected = load(tmp_path / "out" / "rejected")
    assert sorted(rejected["id"]) == ["both_wrong-0", "both_wrong-1"]
    assert all(r.startswith("both_wrong: tool: not_equivalent") for r in rejected["reason"])
    trajectories = load(tmp_path / "out" / "trajectories")
    assert len(trajectories) == 16 and set(trajectories["teacher"]) == {"tool", "reasoning"}

    card = (tmp_path / "out" / "composites" / "README.md").read_text()
    assert "both_correct" in card and "fake-reasoner" in card and "math-verify" in card
    assert f"path: {tmp_path / 'out' / 'composites'}" in card and 'eot_tokens: ["<|im_end|>"]' in card
    assert f"distillery export {tmp_path / 'out' / 'composites'} --tokenizer" in card
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"][0]["data_files"]
    saved = json.loads((tmp_path / "out" / ".distillery" / "summary.json").read_text())
    assert saved["composites"] == 6 and saved["rejected"] == 2


def test_order_both_doubles_composites_and_keeps_one_rejection(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              stitching={"order": "both"})
        summary = run(recipe)
        first_requests = len(server.requests)
        shutil.rmtree(tmp_path / "out")  # a fresh start: no journal, and no cached stage results either
        assert run(recipe)["cases"] == summary["cases"]
        assert len(server.requests) == 2 * first_requests
    assert summary["cases"] == {"both_correct": 2, "first_correct": 2, "second_corrects": 2, "both_wrong": 1}
    composites = load(tmp_path / "out" / "composites")
    pairs = sorted(zip(composites["id"], composites["first_teacher"], composites["case"]))
    assert pairs == [
        ("both_correct-0", "reasoning", "both_correct"), ("both_correct-0", "tool", "both_correct"),
        ("reasoning_only-0", "reasoning", "first_correct"), ("reasoning_only-0", "tool", "second_corrects"),
        ("tool_only-0", "reasoning", "second_corrects"), ("tool_only-0", "tool", "first_correct"),
    ]
    reasoning_first = next(r for r in composites if r["id"] == "tool_only-0" and r["first_teacher"] == "reasoning")
    assert "Wait, use text reasoning is too tedious, let's try code reasoning." in reasoning_first["text"]


def test_resume_after_the_server_dies_resends_nothing_answered(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=3)
    script = ScriptedTeachers(rows)
    answered = []

    def dies_after_ten(body):
        if len(answered) >= 10:
            return Reply(status=500)
        answered.append(json.dumps([body["model"], body["messages"], body.get("seed")], sort_keys=True))
        return script(body)

    recipe_args = (tmp_path / "problems.jsonl", None, tmp_path / "out")
    with FakeOpenAIServer(dies_after_ten) as broken:
        recipe = write_recipe(tmp_path / "r.yaml", recipe_args[0], broken.base_url, recipe_args[2])
        with pytest.raises(RunFailed) as failure:
            run(recipe)
    message = str(failure.value)
    assert "stage answer[" in message and broken.base_url in message and "HTTP 500" in message
    assert not (tmp_path / "out" / "composites").exists()

    with FakeOpenAIServer(script) as healthy:  # a new port: the journal is keyed without the URL
        recipe = write_recipe(tmp_path / "r.yaml", recipe_args[0], healthy.base_url, recipe_args[2])
        summary = run(recipe)
    resent = set(sent_keys(healthy)) & set(answered)
    assert resent == set()
    assert len(healthy.requests) + len(answered) == 12 * 2 + 12
    assert sum(summary["sent_this_run"].values()) == len(healthy.requests)
    assert summary["cases"] == {"both_correct": 3, "first_correct": 3, "second_corrects": 3, "both_wrong": 3}
    composites = load(tmp_path / "out" / "composites")
    assert len(composites) == 9 and len(set(composites["id"])) == 9

    # A third run of the same recipe is served from the cache and the journal: no request at all.
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = write_recipe(tmp_path / "r.yaml", recipe_args[0], dead.base_url, recipe_args[2])
        again = run(recipe)
    assert dead.requests == [] and again["cases"] == summary["cases"]
    assert again["sent_this_run"] == {"tool": 0, "reasoning": 0}
    # the cached stages are the run's files, not in Prefect's default storage (~/.prefect/storage)
    ours = {path.name for path in (tmp_path / "out" / ".distillery" / "prefect-results").iterdir()}
    assert len(ours) >= 4  # a result per shard task, and the first run's failures
    assert not ours & prefect_default_results()


def test_bad_problem_file_fails_before_any_request(tmp_path):
    (tmp_path / "problems.jsonl").write_text('{"id": "a", "problem": "1+1?"}\n')
    with FakeOpenAIServer(lambda body: Reply(content="x")) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        with pytest.raises(Exception, match=r"problems.jsonl row 0: missing column 'answer'"):
            run(recipe)
    assert server.requests == []


def test_kill_9_mid_run_loses_only_requests_in_flight(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from flows.models.journal import RequestJournal

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=5)
    script = ScriptedTeachers(rows)
    with FakeOpenAIServer(script, latency_s=0.05) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        code = f"import asyncio; from flows.dualdistill import dualdistill; asyncio.run(dualdistill({str(recipe)!r}))"
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        journal_dir = tmp_path / "out" / ".distillery" / "journal"
        deadline = time.monotonic() + 120
        while journal_lines(journal_dir) < 15 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    journal = RequestJournal(journal_dir)
    chat_keys = {key for key, entry in journal._entries.items() if "finish_reason" in entry["value"]}
    assert len(chat_keys) >= 10

    with FakeOpenAIServer(script) as healthy:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", healthy.base_url, tmp_path / "out")
        summary = run(recipe)
    resent = {client_key(body) for body in healthy.requests} & chat_keys
    assert resent == set()
    assert len(healthy.requests) == 20 * 3 - len(chat_keys)  # tool: 2 requests a problem, reasoning: 1
    assert summary["cases"] == {"both_correct": 5, "first_correct": 5, "second_corrects": 5, "both_wrong": 5}
    assert len(load(tmp_path / "out" / "composites")) == 15


def journal_lines(directory) -> int:
    return sum(len(path.read_bytes().splitlines()) for path in directory.glob("*.jsonl"))


def client_key(body: dict) -> str:
    """The journal key the client computed for a request body it sent."""
    from flows.models.journal import request_key

    params = {k: v for k, v in body.items() if k not in {"model", "messages", "n", "tools", "max_tokens"}}
    return request_key("chat", {"model": body["model"], "messages": body["messages"], "params": params,
                                "extra": {}, "tools": body.get("tools"), "sample": 0})


def test_a_larger_limit_sends_only_the_new_problems(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)  # 8 problems, 3 requests each
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        def run_with_limit(limit):
            recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url,
                                  tmp_path / "out")
            data = yaml.safe_load(recipe.read_text())
            data["problems"]["limit"] = limit
            recipe.write_text(yaml.safe_dump(data))
            return run(recipe)

        small = run_with_limit(5)
        assert len(server.requests) == 5 * 3
        large = run_with_limit(8)
    assert len(server.requests) == 8 * 3
    assert sum(large["sent_this_run"].values()) == 3 * 3 and large["problems"] == 8
    assert small["composites"] + small["rejected"] == 5
    assert large["composites"] + large["rejected"] == 8


def budgeted(rows: list[dict], long_ids: set[str]):
    """ScriptedTeachers whose reasoning answers to `long_ids` take 12 words; every reply is cut
    (finish_reason=length) at `max_tokens` words, as a real server would."""
    script = ScriptedTeachers(rows)

    def responder(body):
        reply = script(body)
        row = script.by_text[problem_text(body, list(script.by_text))]
        if teacher_role(body) == "reasoning" and row["id"] in long_ids:
            reply.content = "Let me check every digit twice before I answer this. " + reply.content
        words = reply.content.split(" ")
        if len(words) > body["max_tokens"]:
            return Reply(content=" ".join(words[: body["max_tokens"]]), finish_reason="length")
        return reply

    return responder


def test_raising_max_tokens_resends_exactly_the_cut_requests(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    long_ids = {"reasoning_only-0", "both_correct-1"}
    with FakeOpenAIServer(budgeted(rows, long_ids)) as server:
        def run_with(max_tokens):
            recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
            data = yaml.safe_load(recipe.read_text())
            for role in ("tool", "reasoning"):
                data["teachers"][role]["sampling"]["max_tokens"] = max_tokens
            recipe.write_text(yaml.safe_dump(data))
            return run(recipe)

        short = run_with(8)
        first_requests = len(server.requests)
        trajectories = {(r["problem_id"], r["teacher"]): r for r in load(tmp_path / "out" / "trajectories")}
        for problem_id in long_ids:
            cut = trajectories[(problem_id, "reasoning")]
            assert cut["finish_reason"] == "length" and not cut["correct"]
            assert cut["grade_reason"].startswith("truncated:") and cut["grade_method"] == "rule"
        assert short["teachers"]["reasoning"]["wrong_by_reason"]["truncated"] == 2

        longer = run_with(64)
    resent = server.requests[first_requests:]
    assert sorted(problem_text(body, [r["problem"] for r in rows]) for body in resent) == sorted(
        r["problem"] for r in rows if r["id"] in long_ids)
    assert all(body["max_tokens"] == 64 for body in resent)
    assert longer["sent_this_run"] == {"tool": 0, "reasoning": 2}
    assert longer["reused_across_budget"] == {"tool": 16, "reasoning": 6}
    trajectories = {(r["problem_id"], r["teacher"]): r for r in load(tmp_path / "out" / "trajectories")}
    assert all(trajectories[(i, "reasoning")]["finish_reason"] == "stop" for i in long_ids)
    assert longer["cases"]["both_correct"] == 2 and longer["cases"]["second_corrects"] == 2
