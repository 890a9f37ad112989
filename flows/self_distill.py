"""Self-distillation rounds: the student's own samples become verification / correction data.

In:  a recipe YAML with `problems`, `student` (any backend: endpoint, embedded, transformers),
     `self_distill` (k, beta1, beta2, rule, pick, rounds, teacher_part, trainer) and, to
     generate the teacher part, `teachers` (see recipes/self_distill_demo.yaml).
Out: under `output_dir/self_distill/`, per round r: `round-{r}/` (the SFT rows, with
     `train_detail`), `round-{r}-samples/` (every graded sample), `round-{r}-rejected/`
     (picks with no usable teacher part, with the reason); `summary.json`, `accuracy.png`,
     a Prefect markdown artifact and `output_dir/report.html` (every round as one offline
     page); with a trainer, `round-{r}-model/` (or whatever the `command` trainer names)
     is the next round's student. With `decontaminate:`,
     `contaminated/` lists the problems set aside as copies of benchmark items (never sampled).
Run: `distillery self-distill recipes/self_distill_demo.yaml`.

Per round, per shard: sample K per problem (the tool-using loop) → grade → select (β
rules) → teacher part (generate or reuse) → examples; then publish, summarise, train.
A shard's pipeline is flows/stages/self_distillation.py (`sample_select_complete`), the same
code wherever the shard runs: on this process's event loop with the flow's student and
teachers, or, with `execution: {task_runner: dask | ray}`, on a worker with its own
(`round_shard`, with flows/orchestration/on_worker.py). Every request is journaled and each shard is cached by
content, so a rerun sends only what is missing; a finished round (its datasets and its
trained student) is not redone. Training stays in the flow's process, between rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.grading import GRADER_VERSION
from flows.inputs.decontamination import counts_by_benchmark
from flows.inputs.problem_shards import ProblemShards, run_problems
from flows.inputs.prompts import load_prompt
from flows.models.client import ClientStats
from flows.models.keys import content_key
from flows.orchestration import run_lock
from flows.orchestration.on_worker import add_stats, budget_stop, mirror_id, on_worker, process_grader, watch_other_shards
from flows.orchestration.progress import RunProgress
from flows.models.budget import BudgetReached
from flows.orchestration.run_report import publish_report
from flows.orchestration.runs import PERSISTED, RunFailed, attempt, failed_run, flow_run_name, forget_links, push_to_hub_task
from flows.orchestration.task_runners import Finished, for_workers, map_here, map_on_workers, workers
from flows.publishing.outputs import publish_contaminated
from flows.publishing.rounds import RoundSummary, RowFigures, plot_accuracy, summarise_round, summary_markdown
from flows.publishing.self_distill_outputs import publish_round, round_spool
from flows.publishing.spool import RowSpool
from flows.publishing.storage import check_output, output_location, pull_state, push_outputs, push_state, result_storage
from flows.stages.selection import round_stats
from flows.stages.self_distillation import RoundShardOutcome, TeacherKey, reuse_index, sample_select_complete
from flows.stages.shards import journaled_first_requests, key_parameter, scoped_run_token, shard_name, shards_at_once
from flows.teachers.students import (
    StudentRuntime,
    build_student_runtime,
    student_name,
    student_scope,
    teacher_scope,
    release_student,
    trained_student,
)
from flows.training.trainers import make_trainer
from schemas.recipe import Recipe, StudentSpec, flow_recipe
from schemas.records import GradedTrajectory, Problem

STAGE_VERSION = "1"


@task(name="train-student")
def train_task(recipe: Recipe, round_number: int, dataset: str, student: str) -> str:
    logger = get_run_logger()
    trainer = make_trainer(recipe.self_distill.trainer)
    output = recipe.work_dir / "self_distill" / f"round-{round_number}-model"
    return trainer.train(dataset=Path(dataset), round=round_number, student=student, output=output, log=logger.info)


@task(name="sample-grade-complete", task_run_name="sample[student] round-{round_number} shard-{index:05d}",
      cache_key_fn=key_parameter,
      **PERSISTED, retry_delay_seconds=5)
async def round_shard_task(key: str, recipe: Recipe, student: StudentSpec, reused, round_number: int, index: int,
                           problems: list[Problem], flow_mirror: str, runtime: StudentRuntime | None = None,
                           progress: RunProgress | None = None) -> RoundShardOutcome:
    """A shard of a round sampled, graded, picked, given its teacher parts and stitched: on the
    flow's student `runtime`, or, on a Dask or Ray worker (no runtime), with one of its own."""
    on_sample = progress.ticker(f"sample[r{round_number}]", f"r{round_number}-{shard_name(index)}") if progress else None
    return await round_shard(recipe, student, reused, round_number, index, problems, runtime, flow_mirror, on_sample)


async def round_shard(
    recipe: Recipe, student: StudentSpec, reused: dict[TeacherKey, GradedTrajectory] | None, round_number: int,
    index: int, problems: list[Problem], runtime: StudentRuntime | None = None, flow_mirror: str | None = None,
    on_sample=None,  # noqa: ANN001 - see sample_select_complete
) -> RoundShardOutcome:
    """Self-distillation shard `index` of round `round_number` on the flow's `runtime`, or,
    with none, on a student runtime of its own. `reused`: the reused teacher parts of this
    shard's problems, or None to generate."""
    if runtime is not None:
        return await sample_select_complete(recipe, runtime, process_grader(), round_number, index, problems,
                                            on_sample)

    async def work() -> RoundShardOutcome:
        own = build_student_runtime(recipe, student, reused)
        watch_other_shards(own.budget)
        try:
            return await sample_select_complete(recipe, own, process_grader(), round_number, index, problems)
        finally:
            await own.aclose()

    return await on_worker(recipe, flow_mirror, work)


def _spool_rows(spool: RowSpool, index: int, outcome: RoundShardOutcome) -> None:
    """A finished shard's rows to the round's spool; the outcome keeps their figures and its stats."""
    spool.add(index, {"examples": outcome.examples, "samples": outcome.graded, "rejected": outcome.rejected})
    outcome.rows = RowFigures.of(outcome.graded, outcome.examples, outcome.rejected)
    outcome.graded, outcome.examples, outcome.rejected = [], [], []


async def _round_shards(runner, recipe: Recipe, student: StudentSpec, reused, progress: RunProgress,  # noqa: ANN001
                        scope: str, spool: RowSpool, shards: ProblemShards, round_number: int
                        ) -> tuple[list, ClientStats]:
    """Every shard of the round through `round_shard_task`: on this process's event loop over
    one student runtime (`runner` None), or on the recipe's Dask or Ray cluster, each shard
    there with the reused teacher parts of its own problems only."""
    runtime = build_student_runtime(recipe, student, reused) if runner is None else None
    if runtime is not None:
        samples = shards.count * recipe.self_distill.k
        replay = sum(journaled_first_requests(runtime.student, shards.read(i), recipe.self_distill.k)
                     for i in range(len(shards))) if len(runtime.journal) else 0
        get_run_logger().info("round %d, %s: of %d student samples' first requests, %d to replay and %d to send",
                              round_number, attempt(), samples, replay, samples - replay)
    stats = runtime.student.client.stats if runtime is not None else ClientStats()
    sampled, finished_stage = f"sample[r{round_number}]", f"grade + teacher part[r{round_number}]"
    progress.stage(sampled, shards.count * recipe.self_distill.k, "samples", stats)
    progress.stage(finished_stage, shards.count, "problems")
    # here, the value is read back from its file, so Prefect keeps no finished shard in memory; on
    # a cluster it travels back in memory
    task_ = round_shard_task.with_options(retries=recipe.shard_retries, result_storage=result_storage(recipe),
                                          cache_result_in_memory=runner is not None)
    teachers = teacher_scope(recipe, reused)
    transitions = load_prompt(recipe.self_distill.transitions).digest

    async def finished(done: Finished) -> None:
        if done.failed:
            return
        name = f"r{round_number}-{shard_name(done.index)}"
        progress.shard_done(sampled, name, len(done.value.graded), worked=not done.cached)
        progress.shard_done(finished_stage, name, shards.size(done.index), worked=not done.cached)
        if runtime is None and not done.cached:  # a worker's own student: its figures are this shard's
            add_stats(stats, done.value.sampled)
        await asyncio.to_thread(_spool_rows, spool, done.index, done.value)
        forget_links(done.value)
        await progress.publish()
        await asyncio.to_thread(push_state, recipe)  # a URL output_dir: this shard's answers reach other machines

    shared = recipe if runner is None else for_workers(recipe)
    reachable, mirror = _reachable(student), mirror_id(recipe)

    def calls() -> Iterator[dict]:  # each shard read as it is submitted
        for i, problems in enumerate(map(shards.read, range(len(shards)))):
            ids = {p.id for p in problems}
            own = None if reused is None else {part: answer for part, answer in reused.items() if part[0] in ids}
            # the whole shard's result: samples, grades, selection, teacher parts and examples
            key = content_key("round-shard", scope, content_key(*problems), GRADER_VERSION, recipe.system_prompt,
                              recipe.self_distill, teachers, transitions)
            yield {"key": key, "recipe": shared, "student": reachable, "reused": own, "round_number": round_number,
                   "index": i, "problems": problems, "flow_mirror": mirror, "runtime": runtime,
                   "progress": progress if runtime is not None else None}

    try:
        if runner is None:
            at_once = shards_at_once(runtime.samples_in_flight(), recipe.shard_size * recipe.self_distill.k)
            outcomes = await map_here(task_, calls(), at_once, finished)
        else:
            outcomes = await map_on_workers(runner, task_, calls(), finished)
    finally:
        if runtime is not None:
            await runtime.aclose()
        await asyncio.to_thread(push_state, recipe)
    if (stopped := budget_stop(outcomes)) is not None:
        raise stopped
    if runtime is not None and runtime.budget is not None and runtime.budget.stopped:
        raise runtime.budget.stop()
    return outcomes, stats


def _reachable(student: StudentSpec) -> StudentSpec:
    """A student whose model is a local folder (a trained round's checkpoint), by its
    absolute path: a worker's working directory may not be the flow's."""
    if Path(str(student.model)).exists():
        return student.model_copy(update={"model": str(Path(str(student.model)).resolve())})
    return student


async def _round(recipe: Recipe, runner, student: StudentSpec, reused, progress: RunProgress,
                 shards: ProblemShards, round_number: int, run_token: str) -> RoundSummary:
    started = time.perf_counter()
    scope = content_key("self-distill", STAGE_VERSION, run_token, round_number, student_scope(recipe, student),
                        recipe.self_distill.k)
    spool = round_spool(recipe, round_number)
    spool.clear()
    outcomes, stats = await _round_shards(runner, recipe, student, reused, progress, scope, spool, shards,
                                          round_number)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await progress.publish(force=True)
    if failures:
        spool.remove()  # the finished shards' rows come back from Prefect's cache on the rerun
        raise RunFailed(f"round {round_number}: {len(failures)} shard(s) failed; answers so far are journaled, "
                        f"rerun to resume. First: {type(failures[0]).__name__}: {failures[0]}")
    summary = summarise_round(round_number, student_name(student),
                              round_stats(pl.concat([outcome.stats for outcome in outcomes])),
                              sum((outcome.rows for outcome in outcomes), RowFigures()), sent=stats.sent)
    summary.datasets = publish_round(recipe, summary, spool)
    spool.remove()
    summary.wall_s = round(time.perf_counter() - started, 2)
    return summary


def _located(recipe: Recipe, summary: RoundSummary) -> dict:
    """A round's summary with its datasets and student where the user finds them (URLs for a URL output_dir)."""
    located = summary.to_dict()
    located["datasets"] = {name: output_location(recipe, path) for name, path in summary.datasets.items()}
    if summary.next_student:
        located["next_student"] = output_location(recipe, summary.next_student)
    return located


def _decontamination_scope(recipe: Recipe, shards: ProblemShards) -> list:
    """What a round depends on through `decontaminate:` (nothing without it, so earlier rounds stay valid)."""
    if recipe.decontaminate is None:
        return []
    return [recipe.decontaminate, sorted(record.id for record in shards.set_aside)]


@flow(name="self-distill", flow_run_name=flow_run_name)
async def self_distill(recipe_path: str | None = None, recipe: dict | None = None) -> dict:
    """Run the self-distillation recipe at `recipe_path`; returns the per-round summaries. The run
    holds its output folder's lock (flows/orchestration/run_lock.py) until it ends."""
    recipe = flow_recipe(recipe_path, recipe, "self_distill")
    with run_lock.holding(recipe.state_dir, "self_distill"):
        try:
            return await _self_distill(recipe)
        except (RunFailed, BudgetReached) as error:
            return failed_run(error)


async def _self_distill(recipe: Recipe) -> dict:
    logger = get_run_logger()
    check_output(recipe)
    pull_state(recipe)  # a URL output_dir: its journal, run token and finished rounds into the local mirror
    shards = run_problems(recipe)
    spec = recipe.self_distill
    logger.info("%d problems, K=%d, %d round(s), teacher part: %s", shards.count, spec.k, spec.rounds,
                spec.teacher_part)
    out = recipe.work_dir / "self_distill"
    state = recipe.state_dir / "self_distill"
    state.mkdir(parents=True, exist_ok=True)
    run_token = scoped_run_token(recipe.state_dir)
    reused = reuse_index(spec.reuse_from) if spec.teacher_part == "reuse" else None
    student: StudentSpec = recipe.student
    rounds: list[RoundSummary] = []
    progress = RunProgress(recipe.state_dir, recipe.run_name, "self_distill")
    try:
        async with workers(recipe.execution) as runner:  # None: this process's event loop
            for round_number in range(1, spec.rounds + 1):
                done = state / f"round-{round_number}.json"
                # what a round's datasets and trained student depend on: not how many rounds follow, nor URLs
                fingerprint = content_key(run_token, spec.model_dump(exclude={"rounds"}), student_scope(recipe, student),
                                          teacher_scope(recipe, reused), recipe.problems, recipe.system_prompt,
                                          *_decontamination_scope(recipe, shards))
                if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
                    summary = RoundSummary(**json.loads(done.read_text())["summary"])
                    logger.info("round %d finished earlier; skipped", round_number)
                else:
                    summary = await _round(recipe, runner, student, reused, progress, shards, round_number,
                                           run_token)
                    if spec.trainer.kind != "none":
                        summary.next_student = train_task(quote(recipe), round_number, summary.datasets["examples"],
                                                          student_name(student))
                    done.write_text(json.dumps({"fingerprint": fingerprint, "summary": summary.to_dict()}, indent=2))
                    await asyncio.to_thread(push_outputs, recipe)  # a URL output_dir: the round's datasets, with its marker
                if warning := summary.duplicate_warning:
                    logger.warning("round %d: %s", round_number, warning)
                rounds.append(summary)
                if summary.next_student:
                    release_student(student)
                    student = trained_student(student, summary.next_student)
    except BaseException as error:
        progress.failed(error)
        if isinstance(error, Exception):  # the stages' artifacts say how the run ended, not a stale ETA
            with contextlib.suppress(Exception):
                await progress.publish(force=True)
        raise
    finally:
        await asyncio.to_thread(push_state, recipe)
    progress.finish("completed")
    plot_accuracy(rounds, out / "accuracy.png")
    result = {"run_name": recipe.run_name, "rounds": [_located(recipe, r) for r in rounds],
              "plot": output_location(recipe, out / "accuracy.png"), "grader": GRADER_VERSION,
              "contaminated": counts_by_benchmark(recipe.decontaminate, shards.set_aside)}
    if recipe.decontaminate is not None:
        published = await asyncio.to_thread(publish_contaminated, recipe, out / "contaminated", shards.set_aside,
                                            result["contaminated"])
        result["contaminated_dataset"] = output_location(recipe, published.path)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    result["report_html"] = await publish_report(recipe, "self_distill")
    await asyncio.to_thread(push_outputs, recipe)
    await create_markdown_artifact(
        key="self-distill-" + re.sub(r"[^a-z0-9-]+", "-", recipe.run_name.lower()),
        markdown=summary_markdown(recipe.run_name, rounds), description="Self-distillation rounds",
    )
    if recipe.publish.push_to_hub:
        result["hub"] = push_to_hub_task(quote(recipe), "self_distill")
    return result
