"""One DualDistill shard, start to end: both teachers answer, every answer is graded, the
pairs are stitched. The one copy of the job's pipeline: the flow runs it for every shard,
in its own process or on a Dask or Ray worker (flows/orchestration/on_worker.py).

In:  the recipe, the shard's index and problems, a runtime (the teachers, their clients
     and the sandbox) and a grader.
Out: a `ShardOutcome` — the graded answers, the composites, the rejected pairs, and each
     teacher's request figures for this shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from flows.grading import Grader
from flows.inputs.prompts import load_prompt
from flows.models.client import ClientStats
from flows.stages.shards import answer_shard, grade_shard, shard_name
from flows.stages.stitching import stitch_shard
from flows.teachers.runtime import Runtime
from schemas.recipe import Recipe
from schemas.records import Composite, GradedTrajectory, Problem, Rejected

ROLES = ("tool", "reasoning")


@dataclass
class ShardOutcome:
    graded: list[GradedTrajectory]
    composites: list[Composite]
    rejected: list[Rejected]
    stats: dict[str, ClientStats]  # per role: the runtime's request figures when the shard ended
    sandbox: str  # the sandbox the tool teacher's code ran in


async def answer_grade_stitch(
    recipe: Recipe, index: int, problems: list[Problem], runtime: Runtime, grader: Grader,
    on_answer: Callable[[str], Callable[[], None] | None] = lambda role: None,
) -> ShardOutcome:
    """Shard `index`: both teachers answer at once, then grade, then stitch.
    `on_answer(role)` gives the callback each finished answer of that role calls (progress)."""
    shard = shard_name(index)
    answers = await asyncio.gather(
        *(answer_shard(runtime.teacher(role), problems, shard, runtime.problem_slots(role), on_done=on_answer(role))
          for role in ROLES),
        return_exceptions=True,
    )
    errors = [outcome for outcome in answers if isinstance(outcome, BaseException)]
    if errors:
        raise errors[0] if len(errors) == 1 else BaseExceptionGroup(f"{shard}: both teachers failed", errors)
    trajectories = [t for outcome in answers for t in outcome]
    # in a thread, so the event loop keeps serving the other shards' requests
    graded = await asyncio.to_thread(grade_shard, trajectories, problems, grader, recipe.system_prompt)
    spec = recipe.stitching
    composites, rejected = await asyncio.to_thread(stitch_shard, problems, graded, load_prompt(spec.transitions),
                                                   spec.order, spec.seed, recipe.system_prompt)
    return ShardOutcome(graded, composites, rejected, {role: runtime.teacher(role).client.stats for role in ROLES},
                        runtime.sandbox.name)
