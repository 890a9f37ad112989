"""Turn a recipe into live teachers: clients, prompts, sandbox, journal, embedded servers.

`Runtime` owns every resource a run opens and closes them all in `aclose()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.models.budget import Budget, effective_price, run_budget
from flows.models.batch import BatchClient
from flows.models.client import ModelClient
from flows.models.embedded import EMBEDDED_MODEL_NAME, EmbeddedServer
from flows.models.journal import RequestJournal
from flows.models.keys import fingerprint
from flows.inputs.prompts import load_prompt
from flows.teachers.reasoning import ReasoningTeacher
from flows.execution.sandbox import Sandbox, SandboxLimits, make_sandbox
from flows.teachers.tool import ToolTeacher
from schemas.recipe import Recipe, SandboxSpec, TeacherSpec

DEFAULT_PROMPTS = {"tool": "tool_teacher", "reasoning": "reasoning_teacher"}
FUNCTION_CALLING_PROMPT = "tool_teacher_functions"


def sampling_params(spec: TeacherSpec) -> dict[str, Any]:
    s = spec.sampling
    return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}


def prompt_name(role: str, spec: TeacherSpec) -> str:
    if spec.prompt:
        return spec.prompt
    if role == "tool" and spec.protocol == "function_calling":
        return FUNCTION_CALLING_PROMPT
    return DEFAULT_PROMPTS[role]


def model_name(spec: TeacherSpec) -> str:
    return EMBEDDED_MODEL_NAME if spec.is_embedded else str(spec.model)


def sandbox_limits(spec: SandboxSpec) -> SandboxLimits:
    return SandboxLimits(
        wall_time_s=spec.wall_time_s, cpu_time_s=spec.cpu_time_s, memory_mb=spec.memory_mb,
        max_processes=spec.max_processes, max_output_chars=spec.max_output_chars,
    )


def teacher_fingerprint(role: str, recipe: Recipe) -> str:
    """What decides a teacher's answers — never the URL or the key. Part of cache keys."""
    spec: TeacherSpec = getattr(recipe.teachers, role)
    parts: dict[str, Any] = {
        "role": role,
        "model": model_name(spec),
        "sampling": spec.sampling.model_dump(),
        "prompt": load_prompt(prompt_name(role, spec)).digest,
    }
    if role == "tool":
        parts |= {"protocol": spec.protocol, "max_tool_calls": spec.max_tool_calls,
                  "limits": dataclasses.asdict(sandbox_limits(recipe.sandbox))}
    return fingerprint(parts)


@dataclass
class Runtime:
    tool: ToolTeacher
    reasoning: ReasoningTeacher
    journal: RequestJournal
    sandbox: Sandbox
    servers: list[EmbeddedServer] = field(default_factory=list)
    budget: Budget | None = None
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict, repr=False)

    def teacher(self, role: str) -> ToolTeacher | ReasoningTeacher:
        return self.tool if role == "tool" else self.reasoning

    def problems_in_flight(self, role: str) -> int:
        """Problems under way per teacher: twice its request limit, so that a problem
        waiting for its code to run does not leave a request slot idle."""
        return 2 * self.teacher(role).client.capacity

    def problem_slots(self, role: str) -> asyncio.Semaphore:
        if role not in self._slots:
            self._slots[role] = asyncio.Semaphore(self.problems_in_flight(role))
        return self._slots[role]

    async def aclose(self) -> None:
        for teacher in (self.tool, self.reasoning):
            await teacher.client.aclose()
        for server in self.servers:
            server.stop()
        self.journal.close()


def model_client(spec: TeacherSpec, journal: RequestJournal, servers: list[EmbeddedServer],
                 budget: Budget | None = None) -> ModelClient:
    extra = {"repeat_penalty": spec.sampling.repeat_penalty} if spec.sampling.repeat_penalty is not None else {}
    if spec.mode == "batch":  # the provider's Files + Batches API (flows/models/batch.py)
        return BatchClient(model=model_name(spec), base_url=spec.base_urls[0], journal=journal, api_key=spec.api_key(),
                           timeout_s=spec.timeout_s, max_retries=spec.max_retries, extra_body=extra, budget=budget,
                           price=effective_price(spec), batch=spec.batch)
    if spec.is_embedded:
        server = EmbeddedServer()
        servers.append(server)
        base_url: Any = server.base_url
    else:
        base_url = spec.base_url  # one URL or the pool's list
    return ModelClient(
        model=model_name(spec), base_url=base_url, journal=journal, api_key=spec.api_key(),
        max_concurrency=spec.max_concurrency, auto_concurrency=spec.auto_concurrency, timeout_s=spec.timeout_s,
        max_retries=spec.max_retries, extra_body=extra, budget=budget, price=effective_price(spec),
    )


def journal_dir(recipe: Recipe) -> Path:
    return recipe.state_dir / "journal"


def build_runtime(recipe: Recipe) -> Runtime:
    journal = RequestJournal(journal_dir(recipe))
    servers: list[EmbeddedServer] = []
    spec = recipe.sandbox
    sandbox = make_sandbox(spec.kind, sandbox_limits(spec), max_parallel=spec.max_parallel, max_sessions=spec.max_sessions)
    budget = run_budget(recipe.budget, journal_dir(recipe), teacher_roles(recipe))
    tool, reasoning = build_teachers(recipe, journal, sandbox, servers, budget)
    return Runtime(tool=tool, reasoning=reasoning, journal=journal, sandbox=sandbox, servers=servers, budget=budget)


def teacher_roles(recipe: Recipe) -> list[tuple[str, TeacherSpec]]:
    return [(role, getattr(recipe.teachers, role)) for role in ("tool", "reasoning")] if recipe.teachers else []


def build_teachers(
    recipe: Recipe, journal: RequestJournal, sandbox: Sandbox, servers: list[EmbeddedServer],
    budget: Budget | None = None,
) -> tuple[ToolTeacher, ReasoningTeacher]:
    """The recipe's two teachers over a shared journal and sandbox."""
    tool_spec, reasoning_spec = recipe.teachers.tool, recipe.teachers.reasoning
    tool = ToolTeacher(
        client=model_client(tool_spec, journal, servers, budget), prompt=load_prompt(prompt_name("tool", tool_spec)),
        params=sampling_params(tool_spec), sandbox=sandbox, journal=journal,
        protocol=tool_spec.protocol, max_tool_calls=tool_spec.max_tool_calls,
    )
    reasoning = ReasoningTeacher(
        client=model_client(reasoning_spec, journal, servers, budget),
        prompt=load_prompt(prompt_name("reasoning", reasoning_spec)), params=sampling_params(reasoning_spec),
    )
    return tool, reasoning
