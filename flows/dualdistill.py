"""DualDistill composites: two teachers answer, answers are graded, pairs are stitched.

In:  a recipe YAML (see recipes/demo.yaml): problems, a tool-using and a reasoning
     teacher (the embedded default model or any OpenAI-compatible endpoint),
     the stitching order, sandbox limits.
Out: under the recipe's `output_dir`, three Parquet datasets with cards —
     `composites/` (the SFT rows), `trajectories/` (every graded answer) and
     `rejected/` (both answers wrong), with `decontaminate:` `contaminated/` (problems
     set aside as copies of benchmark items, never sent to a teacher) — plus
     `.distillery/summary.json`, a Prefect markdown artifact with the same summary, and
     `report.html` (the run as one offline page, linked as an artifact).
Run: `distillery run recipes/demo.yaml` (no Prefect server needed), or deploy
     this flow (`dualdistill`) to a server and pass `recipe_path`.

The flow wires: recipe in, one `shard` task per shard out to the task runner, the rows of
each finished shard to the spool (flows/publishing/spool.py), datasets published from it at
the end, summary written. A shard's pipeline — [tool teacher ‖ reasoning teacher] → grade →
stitch — is flows/stages/dualdistill_shard.py, the same code wherever the shard runs: on
this process's event loop (`execution: threads`, the default) with the flow's teachers, or
on a Dask or Ray worker with teachers of its own (`dualdistill_shard` below, with
flows/orchestration/on_worker.py). A shard task is cached by the content of its inputs;
every request is journaled, so a rerun after a failure sends only what is missing. A shard
that fails does not stop the others; the run then fails with a message naming the stage,
the endpoint and the error, and publishes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.grading import GRADER_VERSION
from flows.inputs.decontamination import counts_by_benchmark
from flows.inputs.problem_shards import ProblemShards, run_problems
from flows.inputs.prompts import load_prompt
from flows.models.client import ClientStats
from flows.models.keys import content_key
from flows.orchestration import run_lock, runs
from flows.orchestration.on_worker import add_stats, budget_stop, mirror_id, on_worker, process_grader, watch_other_shards
from flows.orchestration.progress import RunProgress, journal_by_role
from flows.models.budget import BudgetReached
from flows.orchestration.run_report import publish_report
from flows.orchestration.runs import PERSISTED, RunFailed, failed_run, flow_run_name, forget_links, push_to_hub_task
from flows.orchestration.task_runners import Finished, for_workers, map_here, map_on_workers, workers
from flows.publishing.outputs import preload_publishing, publish_outputs, row_spool
from flows.publishing.report import RunSummary, combine, summarise, summary_markdown
from flows.publishing.spool import RowSpool
from flows.publishing.storage import check_output, output_location, pull_state, push_outputs, push_state, result_storage
from flows.stages.dualdistill_shard import ROLES, ShardOutcome, answer_grade_stitch
from flows.stages.shards import (
    ShardFailed,
    journaled_first_requests,
    key_parameter,
    scoped_run_token,
    shard_name,
    shards_at_once,
)
from flows.teachers.runtime import Runtime, build_runtime, journal_dir, teacher_fingerprint
from schemas.recipe import Recipe, flow_recipe
from schemas.records import Contaminated, Problem

STAGE_VERSION = "3"  # bump when a stage's output format changes, to invalidate cached results


# Task inputs are wrapped in `quote(...)`: Prefect otherwise walks every record of every list
# passed to a task looking for futures (17 s of CPU for 2,000 problems).


@task(name="answer-grade-stitch", task_run_name="answer[tool+reasoning] shard-{index:05d}",
      cache_key_fn=key_parameter, **PERSISTED,
      retry_delay_seconds=5)
async def shard_task(key: str, recipe: Recipe, index: int, problems: list[Problem], flow_mirror: str,
                     runtime: Runtime | None = None, progress: RunProgress | None = None) -> ShardOutcome:
    """One shard answered, graded and stitched: on the flow's `runtime`, or, on a Dask or Ray
    worker (no runtime), with teachers of its own."""
    on_answer = (lambda role: progress.ticker(f"answer[{role}]", shard_name(index))) if progress else (lambda role: None)
    return await dualdistill_shard(recipe, index, problems, runtime, flow_mirror, on_answer)


async def dualdistill_shard(
    recipe: Recipe, index: int, problems: list[Problem], runtime: Runtime | None = None,
    flow_mirror: str | None = None, on_answer=lambda role: None,  # noqa: ANN001 - see answer_grade_stitch
) -> ShardOutcome:
    """DualDistill shard `index` on the flow's `runtime`, or, with none (a worker), on one of
    its own. `flow_mirror`: the flow's `mirror_id` (see `on_worker`)."""
    if runtime is not None:
        return await answer_grade_stitch(recipe, index, problems, runtime, process_grader(), on_answer)

    async def work() -> ShardOutcome:
        own = build_runtime(recipe)
        watch_other_shards(own.budget)
        try:
            return await answer_grade_stitch(recipe, index, problems, own, process_grader())
        finally:
            await own.aclose()

    return await on_worker(recipe, flow_mirror, work)



@task(name="publish")
async def publish_task(recipe: Recipe, summary: RunSummary, spool: RowSpool,
                       contaminated: tuple[Contaminated, ...] = ()) -> dict[str, str]:
    published = await asyncio.to_thread(publish_outputs, recipe, summary, spool, contaminated)
    return {name: output_location(recipe, dataset.path) for name, dataset in published.items()}


def _shard_key(recipe: Recipe, answer_scopes: dict[str, str], problems: list[Problem]) -> str:
    """The content key of a shard's whole result: its problems, both teachers, grader, stitching."""
    problems_key = content_key(*problems)
    answers = [content_key(answer_scopes[role], problems_key) for role in ROLES]
    return content_key("shard", *answers, GRADER_VERSION, recipe.stitching, recipe.system_prompt,
                       load_prompt(recipe.stitching.transitions).digest)


async def _run_shards(
    runner, recipe: Recipe, answer_scopes: dict[str, str], progress: RunProgress, spool: RowSpool,  # noqa: ANN001
    shards: ProblemShards,
) -> tuple[list, dict[str, ClientStats], str]:
    """Every shard through `shard_task`: on this process's event loop with one runtime for all
    (`runner` None), or on the recipe's Dask or Ray cluster. Each finished shard's rows go to
    the spool and its figures are kept; returns each shard's figures or failure, the request
    figures per teacher, and the sandbox the code ran in."""
    runtime = build_runtime(recipe) if runner is None else None
    get_run_logger().info(_attempt_line(recipe, runtime, shards))
    stats = ({role: runtime.teacher(role).client.stats for role in ROLES} if runtime is not None
             else {role: ClientStats() for role in ROLES})
    for role in ROLES:
        progress.stage(f"answer[{role}]", shards.count, "answers", stats[role])
    progress.stage("grade", 2 * shards.count, "answers")
    # here, the value is read back from its file, so Prefect keeps no finished shard in memory; on
    # a cluster it travels back in memory
    task_ = shard_task.with_options(retries=recipe.shard_retries, result_storage=result_storage(recipe),
                                    cache_result_in_memory=runner is not None)
    figures: dict[int, RunSummary] = {}
    sandbox = runtime.sandbox.name if runtime is not None else "unknown"

    async def finished(done: Finished) -> None:
        nonlocal sandbox
        if done.failed:
            return
        name, outcome = shard_name(done.index), done.value
        for role in ROLES:
            progress.shard_done(f"answer[{role}]", name, shards.size(done.index), worked=not done.cached)
            if runtime is None and not done.cached:  # a worker's own clients: its figures are this shard's
                add_stats(stats[role], outcome.stats[role])
        progress.shard_done("grade", name, len(outcome.graded), worked=True)
        sandbox = outcome.sandbox
        await asyncio.to_thread(spool.add, done.index, {"composites": outcome.composites,
                                                        "trajectories": outcome.graded, "rejected": outcome.rejected})
        figures[done.index] = summarise(recipe.run_name, shards.size(done.index), outcome.graded,
                                        outcome.composites, outcome.rejected)
        outcome.graded, outcome.composites, outcome.rejected = [], [], []  # in the spool now
        forget_links(outcome)
        await progress.publish()
        await asyncio.to_thread(push_state, recipe)  # a URL output_dir: this shard's answers reach other machines

    shared = recipe if runner is None else for_workers(recipe)
    # quote(...)d only on this event loop (map_here): Dask rebuilds tuples (a quote is one) as plain tuples
    calls = ({"key": _shard_key(recipe, answer_scopes, problems), "recipe": shared, "index": i, "problems": problems,
              "flow_mirror": mirror_id(recipe), "runtime": runtime, "progress": progress if runtime else None}
             for i, problems in enumerate(map(shards.read, range(len(shards)))))  # read as each is submitted
    try:
        if runner is None:
            at_once = shards_at_once(max(runtime.problems_in_flight(role) for role in ROLES), recipe.shard_size)
            outcomes = await map_here(task_, calls, at_once, finished)
        else:
            outcomes = await map_on_workers(runner, task_, calls, finished)
    finally:
        if runtime is not None:
            await runtime.aclose()
        await asyncio.to_thread(push_state, recipe)
    return [figures.get(i, o) if not isinstance(o, BaseException) else o for i, o in enumerate(outcomes)], stats, sandbox


def _attempt_line(recipe: Recipe, runtime: Runtime | None, shards: ProblemShards) -> str:
    """What this attempt replays and sends, said once at its start (a retry from the UI is a new
    attempt of the same flow run)."""
    attempt = runs.attempt()
    requests = shards.count * len(ROLES)
    if runtime is None:  # on workers: the journal's answers, by role
        answers = {role: figures["answers"] for role, figures in journal_by_role(journal_dir(recipe)).items()}
        journaled = ", ".join(f"{role} {answers.get(role, 0):,}" for role in ROLES)
        return f"{attempt}: {requests:,} first requests ({shards.count:,} problems × {len(ROLES)} teachers); " \
               f"answers journaled by earlier attempts, replayed rather than sent: {journaled}"
    if not len(runtime.journal):
        return f"{attempt}: nothing journaled yet; {requests:,} first requests to send " \
               f"({shards.count:,} problems × {len(ROLES)} teachers)"
    replay = {role: sum(journaled_first_requests(runtime.teacher(role), shards.read(i)) for i in range(len(shards)))
              for role in ROLES}
    return (f"{attempt}: of {requests:,} first requests ({shards.count:,} problems × {len(ROLES)} teachers), "
            + ", ".join(f"{role} {replay[role]:,} to replay and {shards.count - replay[role]:,} to send" for role in ROLES)
            + " (a tool teacher's later turns are replayed or sent as they come)")


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
        try:
            return await _dualdistill(recipe, started)
        except (RunFailed, BudgetReached) as error:
            return failed_run(error)


async def _dualdistill(recipe: Recipe, started: float) -> dict:
    logger = get_run_logger()
    check_output(recipe)
    pull_state(recipe)  # a URL output_dir: its journal and run token into the local mirror
    shards = run_problems(recipe)  # fails early, before any model call, on a bad problem source
    logger.info("%d problems in %d shard(s) of up to %d", shards.count, len(shards), recipe.shard_size)
    if shards.set_aside:
        logger.info("%d problem(s) set aside as copies of benchmark items (contaminated/)", len(shards.set_aside))

    run_token = scoped_run_token(recipe.state_dir)
    # what an answer stage's result depends on besides its problems (never URLs or keys)
    answer_scopes = {
        role: content_key("answer", STAGE_VERSION, run_token, teacher_fingerprint(role, recipe))
        for role in ROLES
    }
    progress = RunProgress(recipe.state_dir, recipe.run_name, "dualdistill")
    spool = row_spool(recipe)
    spool.clear()
    preloaded = asyncio.create_task(asyncio.to_thread(preload_publishing))  # `datasets` (~1 s) while teachers answer
    async with workers(recipe.execution) as runner:  # None: this process's event loop
        outcomes, stats, sandbox = await _run_shards(runner, recipe, answer_scopes, progress, spool, shards)
    stopped = budget_stop(outcomes)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        progress.finish("stopped by its budget" if stopped else "failed")
    await progress.publish(force=True)
    if failures:
        spool.remove()  # the finished shards' rows come back from Prefect's cache on the rerun
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
    report_html = await publish_report(recipe, "dualdistill")
    await asyncio.to_thread(push_outputs, recipe)
    await create_markdown_artifact(
        key="dualdistill-" + re.sub(r"[^a-z0-9-]+", "-", recipe.run_name.lower()),
        markdown=summary_markdown(summary), description="DualDistill run summary",
    )
    result = {**summary.to_dict(), "report_html": report_html}
    if recipe.publish.push_to_hub:
        result["hub"] = push_to_hub_task(quote(recipe), "dualdistill")
    return result
