"""DualDistill composites: two teachers answer, answers are graded, pairs are stitched.

In:  a recipe YAML (see recipes/demo.yaml): problems, a tool-using and a reasoning
     teacher (the embedded default model or any OpenAI-compatible endpoint),
     the stitching order, sandbox limits.
Out: under the recipe's `output_dir`, three Parquet datasets with cards —
     `composites/` (the SFT rows), `trajectories/` (every graded answer) and
     `rejected/` (both answers wrong), with `decontaminate:` `contaminated/` (problems
     set aside as copies of benchmark items, never sent to a teacher) — plus
     `.distillery/summary.json` and a Prefect markdown artifact with the same summary.
Run: `distillery run recipes/demo.yaml` (no Prefect server needed), or deploy
     this flow (`dualdistill`) to a server and pass `recipe_path`.

Per shard: load → [tool teacher ‖ reasoning teacher] → grade → stitch → its rows to
the spool (flows/publishing/spool.py), which publishing streams into Parquet at the end;
shards run concurrently and every stage is a Prefect task cached by the content of its
inputs. The teachers answer on an event loop of their own, in its own thread
(flows/orchestration/request_loop.py), so Prefect's work on this one never holds a
request back. Every request is journaled, so a rerun after a failure sends only what
is missing. A shard that fails does not stop the others; the run then fails
with a message naming the stage, the endpoint and the error, and publishes nothing.

Where shards run is the recipe's `execution:` (flows/orchestration/task_runners.py): in this
process's event loop (`threads`, the default), or one self-contained task per shard on a
Dask or Ray cluster (flows/stages/remote_shard.py), each with its own clients, cached by
the content of the shard's inputs.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.grading import GRADER_VERSION, Grader
from flows.publishing.outputs import preload_publishing, publish_outputs, row_spool
from flows.inputs.decontamination import counts_by_benchmark
from flows.inputs.problem_shards import ProblemShards, run_problems
from flows.inputs.prompts import load_prompt
from flows.publishing.report import RunSummary, combine, summarise, summary_markdown
from flows.publishing.spool import RowSpool
from flows.publishing.storage import check_output, output_location, pull_state, push_outputs, push_state, result_storage
from flows.models.budget import BudgetReached
from flows.models.client import ClientStats
from flows.models.keys import content_key
from flows.teachers.runtime import Runtime, build_runtime, teacher_fingerprint
from flows.orchestration import head_start, interpreter, request_loop, run_lock
from flows.orchestration.head_start import HeadStart
from flows.orchestration.progress import RunProgress
from flows.orchestration.runs import PERSISTED, flow_run_name, forget_links, push_to_hub_task
from flows.orchestration.task_runners import Finished, for_workers, map_on_workers, workers
from flows.orchestration.on_worker import add_stats, budget_stop, mirror_id
from flows.stages.remote_shard import ShardOutcome, run_shard
from flows.stages.shards import (
    ShardFailed,
    answer_shard,
    key_parameter,
    grade_shard,
    scoped_run_token,
    shard_name,
    shards_at_once,
)
from flows.stages.stitching import stitch_shard
from schemas.recipe import Recipe, flow_recipe
from schemas.records import Composite, Contaminated, GradedTrajectory, Problem, Rejected, Trajectory

STAGE_VERSION = "2"  # bump when a stage's output format changes, to invalidate cached results


class RunFailed(RuntimeError):
    """At least one shard failed; everything answered so far is in the journal."""


# Task inputs below are wrapped in `quote(...)`: Prefect otherwise walks every record of
# every list passed to a task looking for futures (17 s of CPU for 2,000 problems). Every
# task is async: a sync task called from this async flow runs on its event loop and opens
# a sync Prefect client of its own (~50 ms of blocked loop each, per shard).


@task(name="answer-shard", cache_key_fn=key_parameter, **PERSISTED, retries=1, retry_delay_seconds=5)
async def answer_task(key: str, runtime: Runtime, role: str, shard: str, problems: list[Problem],
                      progress: RunProgress, head: HeadStart | None = None) -> list[Trajectory]:
    on_done = progress.ticker(f"answer[{role}]", shard)
    if head is not None and (started := head.take(role, shard, problems)) is not None:
        return await started.answers(on_done)  # under way since before Prefect loaded
    return await request_loop.run(
        answer_shard(runtime.teacher(role), problems, shard, runtime.problem_slots(role), on_done=on_done))


@task(name="grade-shard", cache_key_fn=key_parameter, **PERSISTED)
async def grade_task(
    key: str, grader: Grader, trajectories: list[Trajectory], problems: list[Problem], system_prompt: str | None
) -> list[GradedTrajectory]:
    # in a thread so the event loop keeps serving requests; the Grader serialises its pool
    return await asyncio.to_thread(grade_shard, trajectories, problems, grader, system_prompt)


@task(name="stitch-shard", cache_key_fn=key_parameter, **PERSISTED)
async def stitch_task(key: str, recipe: Recipe, problems: list[Problem], graded: list[GradedTrajectory]):
    spec = recipe.stitching
    return await asyncio.to_thread(stitch_shard, problems, graded, load_prompt(spec.transitions), spec.order,
                                   spec.seed, recipe.system_prompt)


@task(name="shard", cache_key_fn=key_parameter, persist_result=True, retry_delay_seconds=5)
async def shard_task(key: str, recipe: Recipe, index: int, problems: list[Problem], flow_mirror: str) -> ShardOutcome:
    """A whole shard on a Dask or Ray worker: its own runtime, answer, grade, stitch."""
    return await run_shard(recipe, index, problems, flow_mirror)


@task(name="publish")
async def publish_task(recipe: Recipe, summary: RunSummary, spool: RowSpool,
                       contaminated: tuple[Contaminated, ...] = ()) -> dict[str, str]:
    published = await asyncio.to_thread(publish_outputs, recipe, summary, spool, contaminated)
    return {name: output_location(recipe, dataset.path) for name, dataset in published.items()}


async def _process_shard(
    recipe: Recipe, answer_scopes: dict[str, str], runtime: Runtime, head: HeadStart | None, grader: Grader,
    progress: RunProgress, spool: RowSpool, windows: dict[str, asyncio.Semaphore], opened: asyncio.Semaphore,
    index: int, shards: ProblemShards,
) -> RunSummary:
    """One shard read, answered, graded and stitched; its rows go to the spool, its figures are
    returned. At most `opened` shards at once hold their problems and rows in memory."""
    async with opened:
        return await _shard_in_memory(recipe, answer_scopes, runtime, head, grader, progress, spool, windows, index,
                                      shards.read(index))


async def _shard_in_memory(
    recipe: Recipe, answer_scopes: dict[str, str], runtime: Runtime, head: HeadStart | None, grader: Grader,
    progress: RunProgress, spool: RowSpool, windows: dict[str, asyncio.Semaphore], index: int, problems: list[Problem],
) -> RunSummary:
    shard = shard_name(index)
    answer_keys, grade_key, stitch_key = _stage_keys(recipe, answer_scopes, problems)
    storage = result_storage(recipe)  # the output's .distillery/prefect-results, beside the journal
    answer = answer_task.with_options(retries=recipe.shard_retries, result_storage=storage)
    grade, stitch = (stage.with_options(result_storage=storage) for stage in (grade_task, stitch_task))
    async def answered_by(role: str) -> list[Trajectory]:
        async with windows[role]:
            return await answer(answer_keys[role], quote(runtime), role, shard, quote(problems), quote(progress),
                                quote(head))

    answers = await asyncio.gather(*(answered_by(role) for role in ("tool", "reasoning")), return_exceptions=True)
    errors = [outcome for outcome in answers if isinstance(outcome, BaseException)]
    if errors:
        raise errors[0] if len(errors) == 1 else BaseExceptionGroup(f"{shard}: both teachers failed", errors)
    trajectories = [t for outcome in answers for t in outcome]
    for role in ("tool", "reasoning"):
        progress.shard_done(f"answer[{role}]", shard, len(problems))
    graded = await grade(grade_key, quote(grader), quote(trajectories), quote(problems), recipe.system_prompt)
    stitched = await stitch(stitch_key, quote(recipe), quote(problems), quote(graded))
    composites, rejected = stitched
    progress.shard_done("grade", shard, len(graded), worked=True)
    figures = await _set_aside(recipe, spool, index, len(problems), graded, composites, rejected)
    forget_links(*answers, graded, stitched)
    await progress.publish()
    await asyncio.to_thread(push_state, recipe)  # a URL output_dir: this shard's answers reach other machines
    return figures


async def _set_aside(recipe: Recipe, spool: RowSpool, index: int, problems: int,
                     graded: list[GradedTrajectory], composites: list[Composite], rejected: list[Rejected]
                     ) -> RunSummary:
    """A finished shard's rows to the spool; what the run keeps of them is their figures."""
    await asyncio.to_thread(spool.add, index, {"composites": composites, "trajectories": graded, "rejected": rejected})
    figures = summarise(recipe.run_name, problems, graded, composites, rejected)
    interpreter.settle()
    return figures


def _stage_keys(
    recipe: Recipe, answer_scopes: dict[str, str], problems: list[Problem]
) -> tuple[dict[str, str], str, str]:
    """Content keys of a shard's stages: answers per role, grade, stitch (each covers the ones before)."""
    problems_key = content_key(*problems)
    answer_keys = {role: content_key(scope, problems_key) for role, scope in answer_scopes.items()}
    grade_key = content_key("grade", GRADER_VERSION, answer_keys["tool"], answer_keys["reasoning"], recipe.system_prompt)
    stitch_key = content_key("stitch", grade_key, recipe.stitching, recipe.system_prompt,
                             load_prompt(recipe.stitching.transitions).digest)
    return answer_keys, grade_key, stitch_key


async def _run_here(
    recipe: Recipe, answer_scopes: dict[str, str], progress: RunProgress, spool: RowSpool, shards: ProblemShards
) -> tuple[list, dict[str, ClientStats], str, BudgetReached | None]:
    """Every shard in this process's event loop (`execution.task_runner: threads`), the first
    ones already under way if `distillery run` gave them a head start."""
    head = await head_start.claim(recipe)
    if head is not None:
        get_run_logger().info("head start: %d shard answer(s) (both teachers) began before Prefect had loaded",
                              len(head.started))
    runtime = head.runtime if head is not None else build_runtime(recipe)
    grader = Grader(workers=1)
    for role in ("tool", "reasoning"):
        progress.stage(f"answer[{role}]", shards.count, "answers", runtime.teacher(role).client.stats)
    progress.stage("grade", 2 * shards.count, "answers")
    at_once = {role: shards_at_once(runtime.problems_in_flight(role), recipe.shard_size)
               for role in ("tool", "reasoning")}
    windows = {role: asyncio.Semaphore(n) for role, n in at_once.items()}
    opened = asyncio.Semaphore(2 * max(at_once.values()))  # answering, and as many again grading and stitching
    try:
        outcomes = await asyncio.gather(
            *(_process_shard(recipe, answer_scopes, runtime, head, grader, progress, spool, windows, opened, i, shards)
              for i in range(len(shards))),
            return_exceptions=True,
        )
    finally:
        if head is not None:
            await head.close()  # shards it started that the flow did not take (answers cached by Prefect)
        await request_loop.run(runtime.aclose())
        grader.close()
        await asyncio.to_thread(push_state, recipe)
    stopped = runtime.budget.stop() if runtime.budget is not None and runtime.budget.stopped else None
    stats = {role: runtime.teacher(role).client.stats for role in ("tool", "reasoning")}
    return outcomes, stats, runtime.sandbox.name, stopped


async def _run_on_workers(
    runner, recipe: Recipe, answer_scopes: dict[str, str], progress: RunProgress, spool: RowSpool,
    shards: ProblemShards,
) -> tuple[list, dict[str, ClientStats], str, BudgetReached | None]:
    """One `shard_task` per shard on the recipe's Dask or Ray cluster; progress and request
    figures are counted as each shard returns (cached shards count no request), and its rows
    go to the spool."""
    stats = {role: ClientStats() for role in ("tool", "reasoning")}
    for role in ("tool", "reasoning"):
        progress.stage(f"answer[{role}]", shards.count, "answers", stats[role])
    progress.stage("grade", 2 * shards.count, "answers")
    on_worker = shard_task.with_options(retries=recipe.shard_retries, result_storage=result_storage(recipe))
    sandbox = "unknown"
    figures: dict[int, RunSummary] = {}

    async def count(done: Finished) -> None:
        nonlocal sandbox
        if done.failed:
            return
        name, result = shard_name(done.index), done.value
        for role in ("tool", "reasoning"):
            progress.shard_done(f"answer[{role}]", name, shards.size(done.index), worked=not done.cached)
            if not done.cached:
                add_stats(stats[role], result.stats[role])
        progress.shard_done("grade", name, len(result.graded), worked=True)
        sandbox = result.sandbox
        figures[done.index] = await _set_aside(recipe, spool, done.index, shards.size(done.index), result.graded,
                                               result.composites, result.rejected)
        result.graded, result.composites, result.rejected = [], [], []  # in the spool now
        await progress.publish()
        await asyncio.to_thread(push_state, recipe)

    shared = for_workers(recipe)
    # not quote(...)d as above: Dask rebuilds tuples (a quote is one) as plain tuples;
    # a shard's problems are walked in ~10 ms
    calls = ({"key": content_key("shard", _stage_keys(recipe, answer_scopes, shard)[2]), "recipe": shared,
              "index": i, "problems": shard, "flow_mirror": mirror_id(recipe)}
             for i, shard in enumerate(map(shards.read, range(len(shards)))))  # read as each is submitted
    try:
        outcomes = await map_on_workers(runner, on_worker, calls, count)
    finally:
        await asyncio.to_thread(push_state, recipe)
    stopped = budget_stop(outcomes)
    outcomes = [figures[i] if isinstance(o, ShardOutcome) else o for i, o in enumerate(outcomes)]
    return outcomes, stats, sandbox, stopped


def _failure_message(failures: list[BaseException]) -> str:
    lines = [f"{len(failures)} shard(s) failed; answers already received are journaled, rerun to resume:"]
    flat = [e for f in failures for e in (f.exceptions if isinstance(f, BaseExceptionGroup) else [f])]
    for failure in flat:
        kind = getattr(failure, "type_name", type(failure).__name__)  # a WorkerError names the original type
        lines.append(f"  - {failure}" if isinstance(failure, ShardFailed) else f"  - {kind}: {failure}")
    return "\n".join(lines)


@flow(name="dualdistill", flow_run_name=flow_run_name)
async def dualdistill(recipe_path: str | None = None, recipe: dict | None = None) -> dict:
    """Run the recipe at `recipe_path`; returns the run summary as a dict. The run holds its
    output folder's lock (flows/orchestration/run_lock.py) until it ends."""
    started = time.perf_counter()
    recipe = flow_recipe(recipe_path, recipe, "dualdistill")
    with run_lock.holding(recipe.state_dir, "dualdistill"):
        return await _dualdistill(recipe, started)


async def _dualdistill(recipe: Recipe, started: float) -> dict:
    logger = get_run_logger()
    check_output(recipe)
    pull_state(recipe)  # a URL output_dir: its journal and run token into the local mirror
    # fast and fails early: no task round trip (already read by a `distillery run` head start)
    shards = head_start.problems_of(recipe) or run_problems(recipe)
    logger.info("%d problems in %d shard(s) of up to %d", shards.count, len(shards), recipe.shard_size)
    if shards.set_aside:
        logger.info("%d problem(s) set aside as copies of benchmark items (contaminated/)", len(shards.set_aside))

    run_token = scoped_run_token(recipe.state_dir)
    # what an answer stage's result depends on besides its problems (never URLs or keys)
    answer_scopes = {
        role: content_key("answer", STAGE_VERSION, run_token, teacher_fingerprint(role, recipe))
        for role in ("tool", "reasoning")
    }
    progress = RunProgress(recipe.state_dir, recipe.run_name, "dualdistill")
    preloaded = asyncio.create_task(asyncio.to_thread(preload_publishing))
    spool = row_spool(recipe)
    spool.clear()
    async with workers(recipe.execution) as runner:  # None: this process's event loop
        if runner is None:
            outcomes, stats, sandbox, stopped = await _run_here(recipe, answer_scopes, progress, spool, shards)
        else:
            outcomes, stats, sandbox, stopped = await _run_on_workers(runner, recipe, answer_scopes, progress, spool,
                                                                      shards)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await progress.publish(force=True)
    if failures:
        spool.remove()  # the finished shards' rows come back from Prefect's cache on the rerun
        progress.finish("stopped by its budget" if stopped else "failed")
        if stopped:
            raise stopped
        raise RunFailed(_failure_message(failures))

    summary = combine(recipe.run_name, shards.count, outcomes)
    summary.sandbox, summary.grader = sandbox, GRADER_VERSION
    summary.contaminated = counts_by_benchmark(recipe.decontaminate, shards.set_aside)
    summary.sent_this_run = {role: s.sent for role, s in stats.items()}
    summary.reused_across_budget = {role: s.reused_across_budget for role, s in stats.items()}
    await preloaded
    summary.datasets = await publish_task(quote(recipe), quote(summary), quote(spool), quote(shards.set_aside))
    spool.remove()
    summary.wall_s = round(time.perf_counter() - started, 2)
    progress.finish("completed")

    recipe.state_dir.mkdir(parents=True, exist_ok=True)
    (recipe.state_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    await asyncio.to_thread(push_outputs, recipe)
    await create_markdown_artifact(
        key="dualdistill-" + re.sub(r"[^a-z0-9-]+", "-", recipe.run_name.lower()),
        markdown=summary_markdown(summary), description="DualDistill run summary",
    )
    result = summary.to_dict()
    if recipe.publish.push_to_hub:
        result["hub"] = push_to_hub_task(quote(recipe), "dualdistill")
    return result
