"""`distillery plan RECIPE.yaml`: what a run will ask of each role, how long, at what price.

Without a pilot (`plan.pilot: 0`, the default) no model is called: the figures are what the
recipe fixes — answers, and at most `max_tokens` completion tokens a request — and time only
where a role states `throughput_tokens_per_s`. With `plan.pilot: N` the first N problems (N
prompts for the leakage job; the order is the recipe's, seeded) are answered for real, through
the run's own journal (so the run reuses them), and their requests, tokens and latency per
answer are scaled to the whole run. Cost comes from each role's `price`, online and with the
batch discount.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.models.client import ModelClient
from schemas.recipe import Recipe, TeacherSpec


@dataclass
class PerAnswer:
    """What one answer of a role took in the pilot."""

    answers: int
    requests: float
    prompt_tokens: float
    completion_tokens: float
    latency_s: float  # per request


@dataclass
class RolePlan:
    role: str
    model: str
    answers: int
    concurrency: int  # requests in flight at most (over the pool; `auto`: its upper bound)
    requests: float | None = None
    prompt_tokens: float | None = None
    completion_tokens: float | None = None  # with no pilot: the max_tokens bound
    basis: str = ""
    seconds: float | None = None
    time_basis: str = ""
    cost_online: float | None = None
    cost_batch: float | None = None
    mode: str = "online"


@dataclass
class Plan:
    run_name: str
    job: str
    units: int  # problems (or prompts)
    pilot: int
    roles: list[RolePlan] = field(default_factory=list)
    wall_s: float | None = None  # roles that run side by side overlap; rounds add up
    budget: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def concurrency_of(spec: TeacherSpec) -> int:
    per_endpoint = spec.auto_concurrency.max if spec.max_concurrency == "auto" else spec.max_concurrency
    return per_endpoint * max(1, len(spec.base_urls))


def role_plan(role: str, spec: TeacherSpec, model: str, answers: int, measured: PerAnswer | None,
              requests_bound: int) -> RolePlan:
    plan = RolePlan(role, model, answers, concurrency_of(spec), mode=spec.mode)
    max_tokens = spec.sampling.max_tokens
    if measured is not None:
        plan.requests = answers * measured.requests
        plan.prompt_tokens = answers * measured.prompt_tokens
        plan.completion_tokens = answers * measured.completion_tokens
        plan.basis = f"pilot of {measured.answers} answers"
    else:
        plan.requests = answers * requests_bound
        plan.completion_tokens = plan.requests * max_tokens
        plan.basis = "bound: max_tokens per request" + (", no pilot" if requests_bound == 1 else
                                                          f", up to {requests_bound} requests an answer")
    if measured is not None and measured.latency_s > 0:
        plan.seconds = plan.requests * measured.latency_s / plan.concurrency
        plan.time_basis = f"pilot latency {measured.latency_s:.2f} s a request, {plan.concurrency} in flight"
    elif spec.throughput_tokens_per_s:
        plan.seconds = plan.completion_tokens / spec.throughput_tokens_per_s
        plan.time_basis = f"stated {spec.throughput_tokens_per_s:,.0f} completion tokens/s"
    if spec.price is not None:
        prompt = plan.prompt_tokens or 0.0
        plan.cost_online = (prompt * spec.price.prompt_per_mtok + plan.completion_tokens * spec.price.completion_per_mtok) / 1e6
        plan.cost_batch = plan.cost_online * spec.price.batch_discount
    return plan


def _per_answer(trajectories_or_rows: list[Any], stats, answers: int) -> PerAnswer | None:
    if not answers:
        return None
    requests = stats.sent + stats.replayed
    prompt = sum(_get(t, "prompt_tokens") for t in trajectories_or_rows)
    completion = sum(_get(t, "completion_tokens") for t in trajectories_or_rows)
    return PerAnswer(answers, requests / answers, prompt / answers, completion / answers,
                     stats.answers_latency_s / requests if requests else 0.0)


def _get(item: Any, name: str) -> float:
    return (item.get(name) if isinstance(item, dict) else getattr(item, name, 0)) or 0


async def _pilot_dualdistill(recipe: Recipe, problems) -> dict[str, PerAnswer | None]:
    from flows.stages.shards import answer_shard
    from flows.teachers.runtime import build_runtime

    runtime = build_runtime(recipe)
    try:
        measured = {}
        for role in ("tool", "reasoning"):
            teacher = runtime.teacher(role)
            answers = await answer_shard(teacher, problems, "pilot")
            measured[role] = _per_answer(answers, teacher.client.stats, len(answers))
        return measured
    finally:
        await runtime.aclose()


async def _pilot_self_distill(recipe: Recipe, problems) -> dict[str, PerAnswer | None]:
    from flows.stages.shards import answer_shard
    from flows.teachers.students import build_student_runtime

    reused = None if recipe.self_distill.teacher_part == "generate" else {}
    runtime = build_student_runtime(recipe, recipe.student, reused)
    try:
        samples = await answer_shard(runtime.student, problems, "pilot", samples=recipe.self_distill.k)
        return {"student": _per_answer(samples, runtime.student.client.stats, len(samples))}
    finally:
        await runtime.aclose()


async def _pilot_leakage(recipe: Recipe, prompts) -> dict[str, PerAnswer | None]:
    from flows.models.journal import RequestJournal
    from flows.stages.number_generation import complete_shard
    from flows.teachers.number_teachers import number_teachers
    from flows.teachers.runtime import journal_dir

    journal, servers, measured = RequestJournal(journal_dir(recipe)), [], {}
    try:
        for teacher in number_teachers(recipe):
            client: ModelClient = teacher.client(journal, servers)
            try:
                rows = await complete_shard(teacher, client, prompts, f"{teacher.name}-pilot")
            finally:
                await client.aclose()
            measured[teacher.name] = _per_answer(rows, client.stats, len(rows))
    finally:
        for server in servers:
            server.stop()
        journal.close()
    return measured


def make_plan(recipe: Recipe, job: str) -> Plan:
    """The plan of `recipe` for `job`; runs the pilot when `plan.pilot` > 0."""
    from flows.models.embedded import EMBEDDED_MODEL_NAME

    pilot = recipe.plan.pilot
    budget = {k: v for k, v in recipe.budget.model_dump().items() if v is not None}

    def name(spec: TeacherSpec) -> str:
        return EMBEDDED_MODEL_NAME if spec.is_embedded else str(spec.model)

    if job == "leakage":
        from flows.inputs.number_prompts import draw_prompts

        spec = recipe.leakage
        prompts = draw_prompts(spec.n_prompts, spec.seed, max_count=spec.filter.max_count,
                               max_value=spec.filter.max_value)
        measured = asyncio.run(_pilot_leakage(recipe, prompts[:pilot])) if pilot else {}
        roles = [role_plan(t, s, name(s), spec.n_prompts, measured.get(t), 1)
                 for t, s in (("trait", spec.trait_teacher), ("control", spec.control))]
        plan = Plan(recipe.run_name, job, spec.n_prompts, pilot, roles, budget=budget)
        plan.notes.append("the behavioural probe (training and questions), when on, is not counted")
        plan.wall_s = _overlapping(roles)
        return plan

    count, pilot_problems = _counted(recipe, pilot)
    if job == "dualdistill":
        measured = asyncio.run(_pilot_dualdistill(recipe, pilot_problems)) if pilot else {}
        tool, reasoning = recipe.teachers.tool, recipe.teachers.reasoning
        roles = [role_plan("tool", tool, name(tool), count, measured.get("tool"), tool.max_tool_calls + 1),
                 role_plan("reasoning", reasoning, name(reasoning), count, measured.get("reasoning"), 1)]
        plan = Plan(recipe.run_name, job, count, pilot, roles, budget=budget)
        plan.wall_s = _overlapping(roles)
        return plan

    spec, student = recipe.self_distill, recipe.student
    measured = asyncio.run(_pilot_self_distill(recipe, pilot_problems)) if pilot else {}
    samples = count * spec.k * spec.rounds
    roles = [role_plan("student", student, name(student), samples, measured.get("student"),
                       student.max_tool_calls + 1)]
    plan = Plan(recipe.run_name, job, count, pilot, roles, budget=budget)
    if spec.teacher_part == "generate":
        for role in ("tool", "reasoning"):
            teacher = getattr(recipe.teachers, role)
            roles.append(role_plan(role, teacher, name(teacher), count * spec.rounds, None,
                                   teacher.max_tool_calls + 1 if role == "tool" else 1))
        plan.notes.append("teacher parts: at most one answer per problem and round each (fewer in practice: "
                          "only where the beta rules pick an example)")
    plan.notes.append(f"{spec.rounds} round(s); training time is not counted")
    plan.wall_s = roles[0].seconds
    return plan


def _counted(recipe: Recipe, pilot: int) -> tuple[int, list]:
    """How many problems the run has, and its first `pilot` (read from disk: not all held);
    without those `decontaminate:` sets aside, so no benchmark copy reaches a model."""
    from flows.inputs.decontamination import decontaminated
    from flows.inputs.problem_shards import problem_shards

    with tempfile.TemporaryDirectory(prefix="distillery-plan-") as folder:
        shards = decontaminated(problem_shards(recipe.problems, max(pilot, 1), Path(folder)), recipe.decontaminate)
        return shards.count, shards.read(0) if pilot and shards.count else []


def _overlapping(roles: list[RolePlan]) -> float | None:
    times = [r.seconds for r in roles]
    return None if any(t is None for t in times) else max(times)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    hours = seconds / 3600
    return f"{seconds / 60:.0f} min" if hours < 2 else f"{hours:.1f} h"


def rounded(value: float | None) -> str:
    return "—" if value is None else f"{math.ceil(value):,}"
