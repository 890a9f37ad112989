"""Whole shards, self-contained: what a Dask or Ray worker runs, one function per job.

Nothing of the flow's process reaches a worker (live clients, the sandbox, embedded
servers, the progress file), so each function builds its own clients from the recipe where
it runs, on the shared journal folder, does the shard's whole work, closes everything, and
returns picklable records:

- `run_shard` (DualDistill): both teachers answer, grade, stitch;
- `run_round_shard` (self-distillation): the student samples K per problem, grade, select,
  teacher parts (generated, or reused from the parts the flow hands over), examples;
- `run_numbers_shard` (leakage): one teacher completes a shard of number prompts.

- Requests: each call has its own clients, so the recipe's `max_concurrency` holds per
  shard in flight (per worker on a local cluster, which runs one shard per worker).
- Journal: the same folder as the flow's (`output_dir/.distillery/journal/`), one file per
  role and shard, so workers on several processes or machines never write the same file.
  Answers already journaled (by any run, any worker) are replayed, not sent.
- Budget: `budget:` caps are checked against the journal as it stands when the shard starts
  plus this shard's own requests, and every 0.5 s against what the shared journal folder says
  the other shards have spent since (`Budget.watch_others`): shards running at once can pass
  a cap by what they send within one such refresh. Workers on other machines (a URL
  `output_dir`) see each other's answers only as shards push their journals.
- Embedded models: each shard that has a request to send starts its own llama.cpp server.
- A URL `output_dir` and failures: `on_worker` (flows/orchestration/on_worker.py) syncs the
  journal of a worker on another machine and makes what a shard raises pickle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flows.grading import Grader
from flows.inputs.number_prompts import NumberPrompt
from flows.inputs.prompts import load_prompt
from flows.models.budget import Budget
from flows.models.client import ClientStats
from flows.models.embedded import EmbeddedServer
from flows.models.journal import RequestJournal
from flows.orchestration.on_worker import on_worker, process_grader
from flows.stages.number_generation import GenerationFailed
from flows.stages.shards import answer_shard, grade_shard, shard_name
from flows.stages.stitching import stitch_shard
from flows.teachers.number_teachers import leakage_budget, number_teachers
from flows.teachers.runtime import Runtime, build_runtime, journal_dir
from flows.teachers.students import StudentRuntime, build_student_runtime
from schemas.recipe import Recipe, StudentSpec
from schemas.records import (
    Composite,
    GradedTrajectory,
    Problem,
    Rejected,
    SelfDistillExample,
    SelfDistillRejected,
)

if TYPE_CHECKING:  # polars and the selection stage: imported where a round's shard needs them
    import polars as pl

    from flows.publishing.rounds import RowFigures
    from flows.stages.self_distillation import TeacherKey

ROLES = ("tool", "reasoning")


def _watch_other_shards(budget: Budget | None) -> None:
    """The shards on other workers spend from the same caps: count their journaled answers."""
    if budget is not None:
        budget.watch_others()


@dataclass
class ShardOutcome:
    graded: list[GradedTrajectory]
    composites: list[Composite]
    rejected: list[Rejected]
    stats: dict[str, ClientStats]  # per role: this shard's requests (sent, replayed, tokens)
    sandbox: str  # the sandbox the tool teacher's code ran in, on the worker


async def run_shard(
    recipe: Recipe, index: int, problems: list[Problem], flow_mirror: str | None = None, grader: Grader | None = None,
) -> ShardOutcome:
    """Answer, grade and stitch DualDistill shard `index` with a runtime of its own.
    `flow_mirror`: the flow's `mirror_id` (see `on_worker`). `grader`: default, one per
    process (`process_grader`)."""
    async def work() -> ShardOutcome:
        runtime = build_runtime(recipe)
        _watch_other_shards(runtime.budget)
        try:
            return await _answer_grade_stitch(recipe, index, problems, runtime, grader or process_grader())
        finally:
            await runtime.aclose()

    return await on_worker(recipe, flow_mirror, work)


async def _answer_grade_stitch(
    recipe: Recipe, index: int, problems: list[Problem], runtime: Runtime, grader: Grader
) -> ShardOutcome:
    shard = shard_name(index)
    answers = await asyncio.gather(
        *(answer_shard(runtime.teacher(role), problems, shard, runtime.problem_slots(role)) for role in ROLES),
        return_exceptions=True,
    )
    errors = [outcome for outcome in answers if isinstance(outcome, BaseException)]
    if errors:
        raise errors[0] if len(errors) == 1 else BaseExceptionGroup(f"{shard}: both teachers failed", errors)
    trajectories = [t for outcome in answers for t in outcome]
    graded = await asyncio.to_thread(grade_shard, trajectories, problems, grader, recipe.system_prompt)
    spec = recipe.stitching
    composites, rejected = stitch_shard(problems, graded, load_prompt(spec.transitions), spec.order, spec.seed,
                                        recipe.system_prompt)
    return ShardOutcome(graded, composites, rejected, {role: runtime.teacher(role).client.stats for role in ROLES},
                        runtime.sandbox.name)


@dataclass
class RoundShardOutcome:
    graded: list[GradedTrajectory]  # every graded sample
    stats: pl.DataFrame  # per problem (selection.problem_stats)
    examples: list[SelfDistillExample]
    rejected: list[SelfDistillRejected]
    sampled: ClientStats  # the student's requests
    rows: RowFigures | None = None  # once the rows above are spooled (and emptied): what the summary needs of them


async def run_round_shard(
    recipe: Recipe, student: StudentSpec, reused: dict[TeacherKey, GradedTrajectory] | None, round_number: int,
    index: int, problems: list[Problem], flow_mirror: str | None = None, grader: Grader | None = None,
) -> RoundShardOutcome:
    """Self-distillation shard `index` of round `round_number` with a student runtime of its
    own. `reused`: the reused teacher parts of this shard's problems, or None to generate."""
    async def work() -> RoundShardOutcome:
        runtime = build_student_runtime(recipe, student, reused)
        _watch_other_shards(runtime.budget)
        try:
            return await _sample_select_complete(recipe, runtime, grader or process_grader(), round_number, index,
                                                 problems)
        finally:
            await runtime.aclose()

    return await on_worker(recipe, flow_mirror, work)


async def _sample_select_complete(
    recipe: Recipe, runtime: StudentRuntime, grader: Grader, round_number: int, index: int, problems: list[Problem]
) -> RoundShardOutcome:
    from flows.stages.self_distillation import examples_of, pick_samples

    spec = recipe.self_distill
    shard = f"r{round_number}-{shard_name(index)}"
    samples = await answer_shard(runtime.student, problems, shard, runtime.slots(), samples=spec.k)
    graded = await asyncio.to_thread(grade_shard, samples, problems, grader, recipe.system_prompt)
    picked = pick_samples(graded, spec)
    parts = await runtime.teacher_parts(picked.needed, problems, grader, shard)
    examples, rejected = examples_of(picked, parts, problems, spec, round_number, recipe.system_prompt)
    return RoundShardOutcome(graded, picked.stats, examples, rejected, runtime.student.client.stats)


@dataclass
class NumbersOutcome:
    rows: list[dict[str, Any]]  # one per prompt (number_generation.complete_prompts)
    stats: ClientStats  # the teacher's requests


async def run_numbers_shard(
    recipe: Recipe, teacher: str, prompts: list[NumberPrompt], shard: str, flow_mirror: str | None = None,
) -> NumbersOutcome:
    """The leakage job's `teacher` ("trait" or "control") completes one shard of prompts."""
    async def work() -> NumbersOutcome:
        (numbers,) = [t for t in number_teachers(recipe) if t.name == teacher]
        journal = RequestJournal(journal_dir(recipe))
        servers: list[EmbeddedServer] = []
        budget = leakage_budget(recipe)
        _watch_other_shards(budget)
        client = numbers.client(journal, servers, budget)
        try:
            rows = await numbers.complete(client, prompts, shard)
        except GenerationFailed:
            if budget is not None and budget.stopped:  # the cap, not the endpoint, left prompts unanswered
                raise budget.stop() from None
            raise
        finally:
            await client.aclose()
            for server in servers:
                server.stop()
            journal.close()
        return NumbersOutcome(rows, client.stats)

    return await on_worker(recipe, flow_mirror, work)
