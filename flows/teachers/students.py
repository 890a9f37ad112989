"""The self-distillation student: the tool-using loop (stateful code in the sandbox) on any backend.

Backends by name (`student.backend` in the recipe, `STUDENT_BACKENDS` here):
  endpoint      any OpenAI-compatible server (vLLM `serve`, llama.cpp, hosted APIs);
                K samples are K seeded requests (seed + i), so servers that ignore `n` work
  embedded      the embedded default model on its loopback llama.cpp server
  transformers  a local checkpoint (or the embedded GGUF) generating in this process
  vllm          vLLM's async engine in this process, batching continuously: each sample's
                next turn joins the running batch once its code has run (flows/models/vllm_backend.py)

Every backend is a `ModelClient`, so journaling, budget-aware replay and the tool loop
are the same whatever produces the tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flows.execution.sandbox import Sandbox, make_sandbox
from flows.inputs.prompts import load_prompt
from flows.models.budget import Budget, effective_price, run_budget
from flows.models.client import ModelClient
from flows.models.embedded import EMBEDDED_MODEL_NAME, EmbeddedServer, embedded_gguf_path
from flows.models.journal import RequestJournal
from flows.models.keys import fingerprint
from flows.teachers.reasoning import ReasoningTeacher
from flows.teachers.runtime import (
    build_teachers,
    journal_dir,
    model_client,
    sampling_params,
    sandbox_limits,
    teacher_fingerprint,
    teacher_roles,
)
from flows.teachers.tool import ToolTeacher
from schemas.recipe import Recipe, StudentSpec
from schemas.records import GradedTrajectory

STUDENT_PROMPT = "tool_teacher"


class StudentBackendUnavailable(RuntimeError):
    """A backend this installation cannot run; the message says what to use instead."""


def _endpoint(spec: StudentSpec, journal: RequestJournal, servers: list[EmbeddedServer]) -> ModelClient:
    return model_client(spec, journal, servers)


def _transformers(spec: StudentSpec, journal: RequestJournal, servers: list[EmbeddedServer]) -> ModelClient:
    try:
        from flows.models.transformers_backend import TransformersClient
    except ImportError as exc:
        raise StudentBackendUnavailable(
            f"backend transformers needs torch and transformers ({exc}); install the `train` extra"
        ) from None
    return TransformersClient(model=str(spec.model), checkpoint=_checkpoint(spec), journal=journal,
                              timeout_s=spec.timeout_s, max_retries=spec.max_retries)


def _vllm(spec: StudentSpec, journal: RequestJournal, servers: list[EmbeddedServer]) -> ModelClient:
    from flows.models.vllm_backend import VllmClient, vllm_available

    if (missing := vllm_available()) is not None:
        raise StudentBackendUnavailable(f"backend vllm: {missing}; or serve the checkpoint with `vllm serve` "
                                        "and use `backend: endpoint` with its base_url")
    return VllmClient(model=str(spec.model), checkpoint=_checkpoint(spec), journal=journal,
                      engine_args=spec.engine_args, max_concurrency=spec.max_concurrency,
                      timeout_s=spec.timeout_s, max_retries=spec.max_retries)


def _checkpoint(spec: StudentSpec) -> str:
    """The embedded model's GGUF for its name, else `model` itself (a folder or hub id)."""
    return str(embedded_gguf_path()) if spec.model == EMBEDDED_MODEL_NAME else str(spec.model)


STUDENT_BACKENDS: dict[str, Callable[[StudentSpec, RequestJournal, list[EmbeddedServer]], ModelClient]] = {
    "endpoint": _endpoint,
    "embedded": _endpoint,
    "transformers": _transformers,
    "vllm": _vllm,
}


def build_student(
    spec: StudentSpec, sandbox: Sandbox, journal: RequestJournal, servers: list[EmbeddedServer]
) -> ToolTeacher:
    """The student as a tool-using loop over its backend's client."""
    client = STUDENT_BACKENDS[spec.backend_name](spec, journal, servers)
    # llama.cpp's server returns logprobs only with top_logprobs set; OpenAI and vLLM accept both
    params = sampling_params(spec) | ({"logprobs": True, "top_logprobs": 1} if spec.logprobs else {})
    return ToolTeacher(
        client=client, prompt=load_prompt(spec.prompt or STUDENT_PROMPT), params=params, sandbox=sandbox,
        journal=journal, protocol=spec.protocol, max_tool_calls=spec.max_tool_calls, role="student",
    )


def student_name(spec: StudentSpec) -> str:
    return EMBEDDED_MODEL_NAME if spec.is_embedded else str(spec.model)


def trained_student(spec: StudentSpec, checkpoint: str) -> StudentSpec:
    """The student of the next round. A checkpoint folder is sampled in process (the
    embedded llama.cpp server reads GGUF files only, and an endpoint would need reloading):
    by vllm when the student was on vllm, else by transformers. A name (what a `command`
    trainer may print for a model it loaded into the user's server) stays on the same backend."""
    if Path(checkpoint).is_dir() and spec.backend_name != "vllm":
        data = spec.model_dump(exclude={"endpoint", "base_url", "backend", "model"})
        return StudentSpec.model_validate({**data, "backend": "transformers", "model": checkpoint})
    return spec.model_copy(update={"model": checkpoint})


def release_student(spec: StudentSpec) -> None:
    """Free what a round's student holds in this process once the next round samples another:
    an in-process vLLM engine keeps its memory (on a CPU, a quarter of RAM) until stopped."""
    if spec.backend_name == "vllm":
        from flows.models.vllm_backend import shutdown_engines  # imports vllm's stack: only for its students

        shutdown_engines()


@dataclass
class StudentRuntime:
    """A round's live student, the teachers (or the reuse index) and what they share."""

    student: ToolTeacher
    journal: RequestJournal
    sandbox: Sandbox
    student_scope: str  # what decides the student's samples (never URLs or keys)
    teacher_scope: str  # what decides the teacher parts
    teachers: dict[str, ToolTeacher | ReasoningTeacher] = field(default_factory=dict)
    reused: dict[tuple[str, str], GradedTrajectory] | None = None
    servers: list[EmbeddedServer] = field(default_factory=list)
    budget: Budget | None = None
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    def samples_in_flight(self) -> int:
        """Samples under way: twice the student's request limit (a sample running code holds
        its slot without a request in flight)."""
        return 2 * self.student.client.capacity

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.samples_in_flight())
        return self._slots

    async def aclose(self) -> None:
        await self.student.client.aclose()
        for teacher in self.teachers.values():
            await teacher.client.aclose()
        for server in self.servers:
            server.stop()
        self.journal.close()


def build_student_runtime(
    recipe: Recipe, spec: StudentSpec, reused: dict[tuple[str, str], GradedTrajectory] | None
) -> StudentRuntime:
    journal = RequestJournal(journal_dir(recipe))
    servers: list[EmbeddedServer] = []
    sandbox = make_sandbox(recipe.sandbox.kind, sandbox_limits(recipe.sandbox), max_parallel=recipe.sandbox.max_parallel,
                           max_sessions=recipe.sandbox.max_sessions)
    student = build_student(spec, sandbox, journal, servers)
    roles = [("student", spec), *(teacher_roles(recipe) if reused is None else [])]
    budget = run_budget(recipe.budget, journal_dir(recipe), roles)  # every round counts the rounds before it
    student.client.budget, student.client.price = budget, effective_price(spec)
    teachers: dict[str, ToolTeacher | ReasoningTeacher] = {}
    if reused is None:
        tool, reasoning = build_teachers(recipe, journal, sandbox, servers, budget)
        teachers = {"tool": tool, "reasoning": reasoning}
    return StudentRuntime(student=student, journal=journal, sandbox=sandbox, student_scope=student_scope(recipe, spec),
                          teacher_scope=teacher_scope(recipe, reused), teachers=teachers, reused=reused,
                          servers=servers, budget=budget)


def student_scope(recipe: Recipe, spec: StudentSpec) -> str:
    """What decides the student's samples: never its URL or key."""
    return fingerprint((student_name(spec), spec.sampling, spec.prompt, spec.protocol, spec.max_tool_calls,
                        spec.logprobs, load_prompt(spec.prompt or STUDENT_PROMPT).digest,
                        sandbox_limits(recipe.sandbox)))


def teacher_scope(recipe: Recipe, reused: dict[tuple[str, str], GradedTrajectory] | None) -> str:
    """What decides the teacher parts: the teachers (never URLs or keys), or the reused run."""
    if reused is None:
        return fingerprint(([teacher_fingerprint(role, recipe) for role in ("tool", "reasoning")],))
    return fingerprint(("reuse", str(recipe.self_distill.reuse_from), len(reused)))
