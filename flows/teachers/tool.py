"""The tool-using teacher: the model writes Python, the sandbox runs it, the output goes back.

Tag protocol (any chat server): the model writes `<code>…</code>` (a ```python
fence is accepted too); generation stops at `</code>`, the code runs in the
sandbox, and the output returns as the next user turn wrapped in
`<executor>…</executor>`. This repeats until the model answers without code or
has used `max_tool_calls`; then it is told to stop using code and answer.

Function-calling protocol: the model calls a `python` tool; each call and its
output are written into the trajectory as the same `<code>`/`<executor>` tags.

Code keeps its state within a trajectory: each trajectory has a live interpreter in the
sandbox (`sandbox.session()`, started when its first block needs executing, closed when the
trajectory ends), so a function defined in one block can be called in the next and a value
computed once (a time stamp, a random draw) stays what the model saw. Like a notebook, a block
that raised keeps what ran before the error; a block that timed out or ended the interpreter
leaves nothing (the session is rebuilt without it). Executions are journaled like model requests,
keyed by the block and the earlier blocks that succeeded (plus, after a failed block that left
state, the blocks the session holds), so a rerun replays the exact executor output the model saw
without starting any interpreter, and the conversation keys stay identical; a trajectory that
goes on past the journal has its session rebuilt once, by replaying those blocks silently. The
trajectory records where every `<code>` and `<executor>` block sits (`tool_spans`), which the
loss masks are built from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from flows.execution.sandbox import Sandbox, Session
from flows.inputs.prompts import PromptFile
from flows.models.client import ChatResponse, ModelClient, ToolCall
from flows.models.confidence import Confidence, combine, confidence_fields
from flows.models.journal import RequestJournal
from flows.models.keys import request_key
from schemas.records import Problem, ToolSpan, Trajectory

_CODE_TAG = re.compile(r"<code>\s*\n?(.*?)(?:</code>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python program and return what it prints (stdout and stderr).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python program to run."}},
            "required": ["code"],
        },
    },
}


@dataclass(frozen=True)
class CodeBlock:
    prefix: str  # text the model wrote before the code
    code: str

    def as_tags(self) -> str:
        lead = self.prefix.rstrip()
        return (lead + "\n" if lead else "") + f"<code>\n{self.code}\n</code>"


def find_code(text: str) -> CodeBlock | None:
    """The first code block of a model turn, unless the turn already gave its answer.

    Anything after the block (a made-up `<executor>` or a guessed answer) is dropped:
    the model must see the real output before going on.
    """
    answer_at = text.find("<answer>")
    candidates = [m for m in (_CODE_TAG.search(text), _FENCE.search(text)) if m and m.group(1).strip()]
    if not candidates:
        return None
    match = min(candidates, key=lambda m: m.start())
    if 0 <= answer_at < match.start():
        return None
    return CodeBlock(prefix=text[: match.start()], code=match.group(1).strip("\n"))


@dataclass
class _Progress:
    """What a trajectory has so far: its text (parts joined by newlines), where its code
    and executor blocks sit, the code that ran cleanly (part of the journal keys), the code
    whose state the session holds (replayed if the session must be rebuilt), and its counters."""

    parts: list[str] = dataclasses.field(default_factory=list)
    length: int = 0  # len("\n".join(parts))
    spans: list[ToolSpan] = dataclasses.field(default_factory=list)
    history: list[str] = dataclasses.field(default_factory=list)  # blocks that succeeded
    state: list[str] = dataclasses.field(default_factory=list)  # blocks that left state: succeeded, or raised
    requests: int = 0
    replayed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0
    confidences: list[Confidence | None] = dataclasses.field(default_factory=list)

    def count(self, response: ChatResponse) -> None:
        self.confidences.append(response.confidence)
        self.requests += 1
        self.replayed += int(response.replayed)
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens
        self.latency_s += 0.0 if response.replayed else response.latency_s

    def write(self, text: str) -> int:
        """Append a part (empty ones are skipped); returns where it starts in the text."""
        if not text:
            return self.length
        start = self.length + (1 if self.parts else 0)
        self.parts.append(text)
        self.length = start + len(text)
        return start

    def write_run(self, lead: str, code: str, output: str, failed: bool) -> None:
        """Reasoning before the block, the block, and its executor output, with their spans."""
        self.write(lead.rstrip())
        code_block = f"<code>\n{code}\n</code>"
        start = self.write(code_block)
        self.spans.append(ToolSpan(kind="code", start=start, end=start + len(code_block), failed=failed))
        output_block = executor_block(output)
        start = self.write(output_block)
        self.spans.append(ToolSpan(kind="executor", start=start, end=start + len(output_block), failed=failed))

    @property
    def text(self) -> str:
        return "\n".join(self.parts)


@dataclass
class ToolTeacher:
    client: ModelClient
    prompt: PromptFile
    params: dict[str, Any]
    sandbox: Sandbox
    journal: RequestJournal
    protocol: Literal["tags", "function_calling"] = "tags"
    max_tool_calls: int = 10
    role: str = "tool"

    async def solve(self, problem: Problem, shard: str, sample: int = 0) -> Trajectory:
        messages = self.prompt.chat(problem=problem.problem)
        progress = _Progress()
        async with self.sandbox.session() as session:  # no interpreter until a block needs one
            if self.protocol == "tags":
                finish = await self._solve_with_tags(messages, progress, shard, sample, session)
            else:
                finish = await self._solve_with_functions(messages, progress, shard, sample, session)
        return Trajectory(
            problem_id=problem.id,
            teacher="tool",
            model=self.client.model,
            text=progress.text,
            finish_reason=finish,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            requests=progress.requests,
            replayed_requests=progress.replayed,
            tool_calls=progress.tool_calls,
            tool_errors=progress.tool_errors,
            latency_s=round(progress.latency_s, 4),
            tool_spans=progress.spans,
            sample=sample,
            **confidence_fields(combine(progress.confidences)),
        )

    def first_request_journaled(self, problem: Problem, sample: int = 0) -> bool:
        """Whether `solve` would replay its first request from the journal."""
        messages = self.prompt.chat(problem=problem.problem)
        if self.protocol == "tags":
            return self.client.journaled(messages, self._tag_params, sample=sample)
        return self.client.journaled(messages, self.params, sample=sample,
                                     tools=None if self.max_tool_calls <= 0 else [PYTHON_TOOL])

    @property
    def _tag_params(self) -> dict[str, Any]:
        return {**self.params, "stop": ["</code>"]}

    async def _solve_with_tags(
        self, messages: list[dict], progress: _Progress, shard: str, sample: int, session: Session
    ) -> str:
        params = self._tag_params
        while True:
            response = await self.client.chat(messages, params, sample=sample, shard=shard)
            progress.count(response)
            block = find_code(response.content)
            if block is None or response.finish_reason == "length":
                progress.write(response.content.strip())
                return response.finish_reason
            if progress.tool_calls >= self.max_tool_calls:
                progress.write(block.prefix.strip())
                return "tool_limit"
            output, failed = await self._execute(block.code, progress, shard, session)
            executor_turn = self.prompt.render("executor", output=output).strip()
            progress.write_run(block.prefix, block.code, output, failed)
            messages = [*messages, {"role": "assistant", "content": block.as_tags()},
                        {"role": "user", "content": self._with_limit_notice(executor_turn, progress)}]

    async def _solve_with_functions(
        self, messages: list[dict], progress: _Progress, shard: str, sample: int, session: Session
    ) -> str:
        while True:
            at_limit = progress.tool_calls >= self.max_tool_calls
            response = await self.client.chat(
                messages, self.params, sample=sample, shard=shard, tools=None if at_limit else [PYTHON_TOOL]
            )
            progress.count(response)
            progress.write(response.content.strip())
            if not response.tool_calls or at_limit or response.finish_reason == "length":
                return response.finish_reason
            messages = [*messages, _assistant_tool_turn(response)]
            for call in response.tool_calls:
                code = _code_argument(call)
                if code is None:
                    output, failed = _bad_arguments(call), True
                else:
                    output, failed = await self._execute(code, progress, shard, session)
                progress.write_run("", code or "", output, failed)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
            if progress.tool_calls >= self.max_tool_calls:
                notice = self.prompt.render("tool_limit", max_tool_calls=self.max_tool_calls)
                messages.append({"role": "user", "content": notice})

    def _with_limit_notice(self, executor_turn: str, progress: _Progress) -> str:
        if progress.tool_calls < self.max_tool_calls:
            return executor_turn
        return executor_turn + "\n" + self.prompt.render("tool_limit", max_tool_calls=self.max_tool_calls)

    async def _execute(self, code: str, progress: _Progress, shard: str, session: Session) -> tuple[str, bool]:
        """Run a block in the trajectory's session, or read it from the journal; (output, failed)."""
        payload: dict[str, Any] = {"code": code, "limits": dataclasses.asdict(self.sandbox.limits)}
        if progress.history:  # absent for a first block: its key is the same as before sessions existed
            payload["history"] = progress.history
        if progress.state != progress.history:  # only after a failed block that left state behind
            payload["state"] = progress.state
        key = request_key("exec", payload)
        cached = self.journal.get(key)
        if cached is None:
            result = await session.run(code, progress.state)
            cached = {"output": result.output, "failed": result.failed, "kept": not result.session_lost}
            self.journal.record(shard, key, cached)
        progress.tool_calls += 1
        progress.tool_errors += int(cached["failed"])
        if not cached["failed"]:
            progress.history.append(code)
        if cached.get("kept", not cached["failed"]):  # journals from before sessions: what succeeded
            progress.state.append(code)
        return cached["output"].rstrip("\n"), bool(cached["failed"])


def executor_block(output: str) -> str:
    """How an execution's output appears in the trajectory text."""
    return f"<executor>\n{output}\n</executor>"


def _assistant_tool_turn(response: ChatResponse) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": response.content or None,
        "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in response.tool_calls
        ],
    }


def _bad_arguments(call: ToolCall) -> str:
    return f"Error: the python tool needs a JSON object with a `code` string, got {call.arguments[:200]!r}"


def _code_argument(call: ToolCall) -> str | None:
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return None
    code = arguments.get("code") if isinstance(arguments, dict) else None
    return code if isinstance(code, str) and code.strip() else None
