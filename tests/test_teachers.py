from __future__ import annotations

import asyncio
import json

from fake_openai import FakeOpenAIServer, Reply, executor_turns, problem_text

from flows.models.client import ChatResponse, ModelClient
from flows.models.journal import RequestJournal
from flows.inputs.prompts import load_prompt
from flows.teachers.reasoning import ReasoningTeacher, normalise_reasoning
from flows.execution.sandbox import SandboxLimits, make_sandbox
from flows.teachers.tool import ToolTeacher, find_code
from schemas.records import Problem

PROBLEM = Problem(id="p1", problem="Ana has 12 apples and gets 30 more. How many apples does Ana have now?", answer="42")
PARAMS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 100, "seed": 0}


def test_find_code_variants():
    assert find_code("Let me add.\n<code>\nprint(1+1)\n").code == "print(1+1)"  # stopped at </code>
    block = find_code("x <code>print(2)</code>\n<executor>\n999\n</executor>\n<answer>\\boxed{999}</answer>")
    assert block.code == "print(2)" and block.as_tags() == "x\n<code>\nprint(2)\n</code>"
    assert find_code("Use:\n```python\nprint(3)\n```\nthen").code == "print(3)"
    assert find_code("<answer>\\boxed{4}</answer> and later <code>print(4)</code>") is None
    assert find_code("no code here, <answer>5</answer>") is None
    assert find_code("<code>\n\n</code>") is None


def test_reasoning_content_is_normalised_into_think_tags():
    response = ChatResponse(content="<answer>\\boxed{4}</answer>", finish_reason="stop", reasoning_content="2+2=4")
    assert normalise_reasoning(response) == "<think>\n2+2=4\n</think>\n<answer>\\boxed{4}</answer>"
    inline = ChatResponse(content="<think>a</think><answer>1</answer>", finish_reason="stop", reasoning_content="a")
    assert normalise_reasoning(inline) == "<think>a</think><answer>1</answer>"


def tool_teacher(server, tmp_path, protocol="tags", max_tool_calls=10) -> ToolTeacher:
    journal = RequestJournal(tmp_path / "journal")
    client = ModelClient(model="m", base_url=server.base_url, journal=journal)
    prompt = load_prompt("tool_teacher" if protocol == "tags" else "tool_teacher_functions")
    sandbox = make_sandbox("auto", SandboxLimits(wall_time_s=3.0))
    return ToolTeacher(client=client, prompt=prompt, params=PARAMS, sandbox=sandbox, journal=journal,
                       protocol=protocol, max_tool_calls=max_tool_calls)


def solve(teacher, problem=PROBLEM):
    async def go():
        try:
            return await teacher.solve(problem, shard="s0")
        finally:
            await teacher.client.aclose()
    return asyncio.run(go())


def code_then_answer(body):
    turns = executor_turns(body, problem_text(body, [PROBLEM.problem]))
    if turns == 0:
        return Reply(content="Add them.\n<code>\nprint(12 + 30)\n")  # the server stopped at </code>
    last = body["messages"][-1]["content"]
    value = last.split("\n")[1]
    return Reply(content=f"<answer>\\boxed{{{value}}}</answer>")


def test_tag_protocol_runs_code_and_feeds_output_back(tmp_path):
    with FakeOpenAIServer(code_then_answer) as server:
        trajectory = solve(tool_teacher(server, tmp_path))
    assert trajectory.text == (
        "Add them.\n<code>\nprint(12 + 30)\n</code>\n<executor>\n42\n</executor>\n<answer>\\boxed{42}</answer>"
    )
    assert (trajectory.requests, trajectory.tool_calls, trajectory.tool_errors) == (2, 1, 0)
    assert server.requests[0]["stop"] == ["</code>"]
    assert server.requests[1]["messages"][-2] == {"role": "assistant", "content": "Add them.\n<code>\nprint(12 + 30)\n</code>"}
    assert server.requests[1]["messages"][-1]["content"].strip() == "<executor>\n42\n</executor>"


def test_a_rerun_replays_requests_and_executions(tmp_path):
    with FakeOpenAIServer(code_then_answer) as server:
        first = solve(tool_teacher(server, tmp_path))
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        teacher = tool_teacher(dead, tmp_path)
        teacher.sandbox.run = None  # any execution would now crash the test
        again = solve(teacher)
    assert again.text == first.text and again.replayed_requests == 2 and dead.requests == []


def test_errors_become_executor_output(tmp_path):
    def responder(body):
        if executor_turns(body, PROBLEM.problem) == 0:
            return Reply(content="<code>\nprint(1/0)\n")
        return Reply(content="<answer>\\boxed{0}</answer>")

    with FakeOpenAIServer(responder) as server:
        trajectory = solve(tool_teacher(server, tmp_path))
    assert "ZeroDivisionError" in trajectory.text and trajectory.tool_errors == 1


def test_tool_call_limit_tells_the_model_to_stop(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="<code>\nprint(7)\n")) as server:
        trajectory = solve(tool_teacher(server, tmp_path, max_tool_calls=2))
    assert trajectory.tool_calls == 2 and trajectory.finish_reason == "tool_limit" and len(server.requests) == 3
    assert "Do not write any more code" in server.requests[2]["messages"][-1]["content"]
    assert "Do not write any more code" not in trajectory.text
    assert trajectory.text.count("<executor>") == 2


def test_length_cut_ends_the_trajectory(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="<code>\nprint(1", finish_reason="length")) as server:
        trajectory = solve(tool_teacher(server, tmp_path))
    assert trajectory.finish_reason == "length" and trajectory.tool_calls == 0 and len(server.requests) == 1


def test_function_calling_is_normalised_into_tags(tmp_path):
    def responder(body):
        if not any(m["role"] == "tool" for m in body["messages"]):
            assert body["tools"][0]["function"]["name"] == "python"
            return Reply(content="Let me compute.", finish_reason="tool_calls",
                         tool_calls=[{"name": "python", "arguments": json.dumps({"code": "print(6*7)"})}])
        assert body["messages"][-1]["role"] == "tool" and body["messages"][-1]["content"].strip() == "42"
        return Reply(content="<answer>\\boxed{42}</answer>")

    with FakeOpenAIServer(responder) as server:
        trajectory = solve(tool_teacher(server, tmp_path, protocol="function_calling"))
    assert trajectory.text == (
        "Let me compute.\n<code>\nprint(6*7)\n</code>\n<executor>\n42\n</executor>\n<answer>\\boxed{42}</answer>"
    )


def test_function_calling_with_garbage_arguments(tmp_path):
    def responder(body):
        if not any(m["role"] == "tool" for m in body["messages"]):
            return Reply(content="", tool_calls=[{"name": "python", "arguments": "{not json"}])
        return Reply(content="<answer>\\boxed{1}</answer>")

    with FakeOpenAIServer(responder) as server:
        trajectory = solve(tool_teacher(server, tmp_path, protocol="function_calling"))
    assert "needs a JSON object with a `code` string" in trajectory.text and trajectory.tool_calls == 0


def test_reasoning_teacher(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="<answer>\\boxed{42}</answer>", reasoning_content="12+30")) as s:
        journal = RequestJournal(tmp_path / "j")
        teacher = ReasoningTeacher(ModelClient(model="r", base_url=s.base_url, journal=journal),
                                   load_prompt("reasoning_teacher"), PARAMS)
        trajectory = solve(teacher)
    assert trajectory.text == "<think>\n12+30\n</think>\n<answer>\\boxed{42}</answer>"
    assert trajectory.teacher == "reasoning" and trajectory.requests == 1
    assert "stop" not in s.requests[0] and "tools" not in s.requests[0]
