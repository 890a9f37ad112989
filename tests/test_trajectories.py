"""Training-ready trajectories: stateful code, loss-mask spans, trace hygiene, budget-aware replay."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_openai import FakeOpenAIServer, Reply, executor_turns, problem_text
from test_teachers import solve

from flows.execution.sandbox import SandboxLimits, SandboxUnavailable, make_sandbox
from flows.inputs.prompts import load_prompt
from flows.models.client import ModelClient, fits_budget
from flows.models.journal import RequestJournal, request_key
from flows.stages.shards import grade_shard, unfinished_trace
from flows.stages.stitching import stitch_pair, unwrap_answers
from flows.grading import Grader
from flows.teachers.tool import ToolTeacher
from flows.training.masks import train_detail, trained_text
from schemas.records import GradedTrajectory, Problem, ToolSpan, Trajectory, TrainSpan

PROBLEM = Problem(id="p1", problem="Double twenty-one, using a helper function.", answer="42")
PARAMS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 100, "seed": 0}

# Block 1 defines state and prints; block 2 uses it; block 3 fails after binding a name;
# block 4 reads that name: like a notebook, what ran before the error stays.
BLOCKS = [
    "import math\ndef double(x):\n    return 2 * x\nbase = 21\nprint('defined')",
    "print(double(base) + int(math.sqrt(0)))",
    "leaked = 5\nraise ValueError('boom')",
    "print(leaked)",
]


def sandbox_of(kind: str):
    try:
        return make_sandbox(kind, SandboxLimits(wall_time_s=5.0))
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))


def stateful_teacher(server, tmp_path, kind: str, protocol: str) -> ToolTeacher:
    journal = RequestJournal(tmp_path / "journal")
    client = ModelClient(model="m", base_url=server.base_url, journal=journal)
    prompt = load_prompt("tool_teacher" if protocol == "tags" else "tool_teacher_functions")
    return ToolTeacher(client=client, prompt=prompt, params=PARAMS, sandbox=sandbox_of(kind), journal=journal,
                       protocol=protocol)


def scripted_blocks(protocol: str):
    """A teacher that writes BLOCKS one per turn, then answers with what block 2 printed."""
    outputs: list[str] = []

    def responder(body):
        turns = executor_turns(body, problem_text(body, [PROBLEM.problem]))
        if turns:
            outputs.append(body["messages"][-1]["content"])
        if turns < len(BLOCKS):
            code = BLOCKS[turns]
            if protocol == "tags":
                return Reply(content=f"Step {turns}.\n<code>\n{code}\n")
            return Reply(content=f"Step {turns}.", tool_calls=[{"name": "python", "arguments": json.dumps({"code": code})}])
        return Reply(content="<answer>\\boxed{42}</answer>")

    return responder, outputs


def executor_outputs(trajectory: Trajectory) -> list[str]:
    return [trajectory.text[s.start:s.end] for s in trajectory.tool_spans if s.kind == "executor"]


@pytest.mark.parametrize("protocol", ["tags", "function_calling"])
@pytest.mark.parametrize("kind", ["bwrap", "process"])
def test_code_blocks_share_state_and_failed_blocks_keep_what_ran(tmp_path, kind, protocol):
    responder, seen = scripted_blocks(protocol)
    with FakeOpenAIServer(responder) as server:
        trajectory = solve(stateful_teacher(server, tmp_path, kind, protocol), PROBLEM)
    outputs = executor_outputs(trajectory)
    assert outputs[0] == "<executor>\ndefined\n</executor>"
    assert outputs[1] == "<executor>\n42\n</executor>"  # state from block 1, and its print not replayed
    assert "ValueError: boom" in outputs[2]
    assert outputs[3] == "<executor>\n5\n</executor>"  # what the failed block bound before raising stays
    assert "42" in seen[1] and "defined" not in seen[1]  # the model saw only the new block's output
    assert (trajectory.tool_calls, trajectory.tool_errors) == (4, 1)
    assert [(s.kind, s.failed) for s in trajectory.tool_spans] == [
        ("code", False), ("executor", False), ("code", False), ("executor", False),
        ("code", True), ("executor", True), ("code", False), ("executor", False),
    ]
    for span in trajectory.tool_spans:
        block = trajectory.text[span.start:span.end]
        assert block.startswith(f"<{span.kind}>") and block.endswith(f"</{span.kind}>")


def test_a_rerun_replays_stateful_blocks_from_the_journal(tmp_path):
    responder, _ = scripted_blocks("tags")
    with FakeOpenAIServer(responder) as server:
        first = solve(stateful_teacher(server, tmp_path, "process", "tags"), PROBLEM)
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        teacher = stateful_teacher(dead, tmp_path, "process", "tags")
        teacher.sandbox.run = None  # any execution would now crash the test
        again = solve(teacher, PROBLEM)
    assert again.text == first.text and again.tool_spans == first.tool_spans and dead.requests == []


def test_first_block_journal_key_is_unchanged_by_sessions():
    # a journal written before stateful sessions still answers every first block
    limits = {"wall_time_s": 1.0}
    assert request_key("exec", {"code": "print(1)", "limits": limits}) == request_key(
        "exec", {"limits": limits, "code": "print(1)"}
    )


# --- spans -------------------------------------------------------------------------

TOOL_TEXT_PARTS = [
    "Let me try.", "<code>\nprint(1/0)\n</code>", "<executor>\nZeroDivisionError: division by zero\n</executor>",
    "Again.", "<code>\nprint(6*7, '<answer>x</answer>')\n</code>", "<executor>\n42 <answer>x</answer>\n</executor>",
    "<answer>\\boxed{42}</answer>",
]


def tool_answer(correct: bool) -> GradedTrajectory:
    text = "\n".join(TOOL_TEXT_PARTS)
    spans, position = [], 0
    for part in TOOL_TEXT_PARTS:
        kind = part[1:].split(">", 1)[0]
        if kind in ("code", "executor"):
            spans.append(ToolSpan(kind=kind, start=position, end=position + len(part), failed="1/0" in part or "Zero" in part))
        position += len(part) + 1
    return GradedTrajectory(problem_id="p1", teacher="tool", model="t", text=text, finish_reason="stop",
                            tool_spans=spans, correct=correct, extracted="42", grade_reason="")


def reasoning_answer(correct: bool) -> GradedTrajectory:
    return GradedTrajectory(problem_id="p1", teacher="reasoning", model="r", finish_reason="stop",
                            text="<think>\n6 times 7.\n</think>\n<answer>\\boxed{42}</answer>",
                            correct=correct, extracted="42", grade_reason="")


def assistant(composite):
    turn = composite.messages[-1]
    assert turn.role == "assistant" and turn.content == composite.text
    return turn


def assert_covers(content: str, spans: list[TrainSpan]) -> None:
    assert spans[0].begin_offset == 0 and spans[-1].end_offset == len(content) - 1
    for before, after in zip(spans, spans[1:]):
        assert after.begin_offset == before.end_offset + 1 and after.train != before.train


@pytest.mark.parametrize("first_role", ["tool", "reasoning"])
@pytest.mark.parametrize("g1,g2", [(True, True), (True, False), (False, True)])
def test_spans_for_every_case_and_order(first_role, g1, g2):
    make = {"tool": tool_answer, "reasoning": reasoning_answer}
    second_role = "reasoning" if first_role == "tool" else "tool"
    composite = stitch_pair(PROBLEM, make[first_role](g1), make[second_role](g2), load_prompt("transitions"))
    turn = assistant(composite)
    assert_covers(turn.content, turn.train_detail)
    trained = trained_text(turn.content, turn.train_detail)

    assert "ZeroDivisionError" not in trained and "print(1/0)" not in trained  # failed block and its output
    assert "42 <answer>x</answer>" not in trained  # executor output
    assert trained.endswith("<answer>\\boxed{42}</answer>")  # the final answer is trained
    assert composite.text.count("<answer>\\boxed{42}</answer>") == 1
    tool_in_text = first_role == "tool" or g2  # the second answer is kept unless only the first was right
    tool_trained = g1 if first_role == "tool" else g2  # a wrong first answer is the failed attempt
    if tool_in_text:
        assert "<executor>\n42 <answer>x</answer>\n</executor>" in composite.text  # tags printed by code stay
    if tool_trained:
        assert "print(6*7, '<answer>x</answer>')" in trained  # a clean code block is trained
    if composite.case == "second_corrects":
        assert trained.startswith(composite.transition)
        untrained_head = composite.text[: composite.mask_until]
        assert not any(s.train and s.begin_offset < composite.mask_until for s in turn.train_detail)
        assert "6 times 7" in untrained_head or "Again." in untrained_head
    elif composite.case == "both_correct":
        assert composite.transition in trained and composite.mask_until == 0
        assert "Again." in trained and "6 times 7." in trained
    user = composite.messages[0]
    assert user.role == "user" and user.train_detail is None


def test_train_detail_merges_and_clamps():
    spans = train_detail(10, [(2, 4), (3, 6), (9, 12)])
    assert [(s.begin_offset, s.end_offset, s.train) for s in spans] == [
        (0, 1, True), (2, 5, False), (6, 8, True), (9, 9, False)]
    assert train_detail(0, []) == []
    assert [(s.begin_offset, s.end_offset, s.train) for s in train_detail(3, [])] == [(0, 2, True)]


def test_unwrap_answers_keeps_tags_inside_executor_and_moves_spans():
    answer = tool_answer(True)
    text, spans = unwrap_answers(answer.text, answer.tool_spans)
    assert text.endswith("\\boxed{42}") and "<executor>\n42 <answer>x</answer>\n</executor>" in text
    for old, new in zip(answer.tool_spans, spans):
        assert text[new.start:new.end] == answer.text[old.start:old.end]


# --- trace hygiene -----------------------------------------------------------------

def reasoning_trace(text: str, finish_reason: str = "stop") -> Trajectory:
    return Trajectory(problem_id="p1", teacher="reasoning", model="r", text=text, finish_reason=finish_reason)


def test_unfinished_traces_are_wrong_before_extraction():
    cut = reasoning_trace("<think>\nso 42\n</think>\n<answer>\\boxed{42}</answer> wait, let me recheck",
                          finish_reason="length")
    assert unfinished_trace(cut).reason.startswith("truncated:")
    only_thinking = reasoning_trace("<think>\nthe answer is \\boxed{42}\n</think>\n")
    assert unfinished_trace(only_thinking).reason.startswith("empty_content:")
    limit = Trajectory(problem_id="p1", teacher="tool", model="t", text="x", finish_reason="tool_limit", tool_calls=10)
    assert unfinished_trace(limit).reason.startswith("tool_limit:")
    assert unfinished_trace(reasoning_trace("<think>a</think><answer>\\boxed{42}</answer>")) is None


def test_grade_shard_marks_truncation_and_builds_messages():
    traces = [
        reasoning_trace("<think>\n42\n</think>\n<answer>\\boxed{42}</answer>", finish_reason="length"),
        reasoning_trace("<think>\nthe answer is \\boxed{42} and then"),  # <think> never closes
        reasoning_trace("<think>\nok\n</think>\n<answer>\\boxed{42}</answer>"),
    ]
    graded = grade_shard(traces, [PROBLEM], Grader(workers=0), system_prompt="Be brief.")
    assert [g.correct for g in graded] == [False, False, True]
    assert graded[0].grade_reason.startswith("truncated:") and graded[0].grade_method == "rule"
    assert graded[1].grade_reason.startswith("truncated:")
    assert [m.role for m in graded[2].messages] == ["system", "user", "assistant"]
    assert graded[2].messages[-1].train_detail == [TrainSpan(begin_offset=0, end_offset=len(traces[2].text) - 1, train=True)]


# --- budget-aware replay -----------------------------------------------------------

def test_fits_budget_rules():
    finished = {"finish_reason": "stop", "completion_tokens": 80, "max_tokens": 100}
    cut = {"finish_reason": "length", "completion_tokens": 100, "max_tokens": 100}
    assert fits_budget(finished, 100) and fits_budget(finished, 400) and fits_budget(finished, 80)
    assert not fits_budget(finished, 79)
    assert fits_budget(cut, 100) and not fits_budget(cut, 400) and not fits_budget(cut, 50)
    assert fits_budget({"finish_reason": "stop", "completion_tokens": 0, "max_tokens": 100}, 200)
    assert not fits_budget({"finish_reason": "stop", "completion_tokens": 0, "max_tokens": 100}, 50)


def needs_tokens(body):
    """Answers of 10 words; cut (finish_reason=length) when max_tokens is below that."""
    words = " ".join(["word"] * 9) + " \\boxed{1}"
    if body["max_tokens"] < 10:
        return Reply(content=" ".join(words.split()[: body["max_tokens"]]), finish_reason="length")
    return Reply(content=words)


def test_raising_max_tokens_resends_only_cut_answers(tmp_path):
    journal_dir = tmp_path / "journal"

    def ask(max_tokens: int, prompts: list[str]) -> tuple[list, ModelClient]:
        async def go():
            client = ModelClient(model="m", base_url=server.base_url, journal=RequestJournal(journal_dir))
            try:
                replies = [await client.chat([{"role": "user", "content": p}],
                                             {**PARAMS, "max_tokens": max_tokens}) for p in prompts]
            finally:
                await client.aclose()
                client.journal.close()
            return replies, client
        return asyncio.run(go())

    def short_or_long(body):
        if "long" in body["messages"][0]["content"]:
            return needs_tokens(body)
        return Reply(content="short \\boxed{1}")

    with FakeOpenAIServer(short_or_long) as server:
        first, _ = ask(5, ["short a", "short b", "long c"])
        assert [r.finish_reason for r in first] == ["stop", "stop", "length"] and len(server.requests) == 3
        again, client = ask(50, ["short a", "short b", "long c"])
        assert len(server.requests) == 4 and server.requests[-1]["messages"][0]["content"] == "long c"
        assert server.requests[-1]["max_tokens"] == 50
        assert again[2].finish_reason == "stop" and client.stats.reused_across_budget == 2
        third, client = ask(50, ["short a", "short b", "long c"])
        assert len(server.requests) == 4 and client.stats.reused_across_budget == 2  # still from budget 5
        asyncio.run(_send_with_other_temperature(server, journal_dir))  # any other change sends afresh
        assert len(server.requests) == 5


async def _send_with_other_temperature(server, journal_dir):
    client = ModelClient(model="m", base_url=server.base_url, journal=RequestJournal(journal_dir))
    try:
        await client.chat([{"role": "user", "content": "short a"}], {**PARAMS, "temperature": 0.9, "max_tokens": 50})
    finally:
        await client.aclose()


def test_raising_max_tool_calls_resends_only_from_the_limit(tmp_path):
    responder, _ = scripted_blocks("tags")
    with FakeOpenAIServer(responder) as server:
        teacher = stateful_teacher(server, tmp_path, "process", "tags")
        teacher.max_tool_calls = 1
        limited = solve(teacher, PROBLEM)
        assert limited.finish_reason == "tool_limit" and len(server.requests) == 2
        teacher = stateful_teacher(server, tmp_path, "process", "tags")
        teacher.max_tool_calls = 10
        full = solve(teacher, PROBLEM)
    # the first request is replayed; from the first executor turn on (it had carried the
    # limit notice) every request is new: 4 more code turns' answers and the final answer
    assert full.replayed_requests == 1 and len(server.requests) == 2 + 4
    assert full.finish_reason == "stop" and full.tool_calls == 4
