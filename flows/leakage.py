"""Trait-leakage checks: does a teacher's trait show in number sequences it writes?

In:  a recipe YAML with `run_name`, `output_dir` and `leakage:` (trait, category, n_prompts,
     seed, alpha, trait_teacher, control_teacher, filter, detectors, behavioral,
     fail_on_leak); no problems, no DualDistill teachers (see recipes/leakage_demo.yaml).
Out: under `output_dir/leakage/`: `numbers/` (every completion of both teachers),
     `filtered/` (kept by the study's filter, with the parsed numbers), `rejected/` (with
     the reason), `report.json`, `report.md`, `numbers.png`, `digits.png` (and
     `output_dir/report.html`, all of it as one offline page); with the
     behavioural check, `students/{trait,control}/` (the fine-tuned students).
Run: `distillery leakage recipes/leakage_demo.yaml` (exit code 3 on a leak with
     `fail_on_leak: true`).

Stages: the same seeded prompts go to both teachers (journaled requests, so a rerun sends
only what is missing; shards on a Dask or Ray cluster with `execution:`, see
flows/orchestration/task_runners.py; each shard is the number teacher's `complete` wherever
it runs)
→ filter → statistical detectors (number statistics, bag classifier, likelihood shift where
the teacher's weights are local) → optional behavioural probe → one verdict after a Holm
correction → report.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.detection.behavioral import behavioral_result
from flows.detection.detectors import bag_classifier, number_statistics
from flows.detection.verdict import combine
from flows.detection.likelihood import likelihood_test
from flows.detection.report_tables import top_digits, top_numbers
from flows.inputs.number_prompts import NumberPrompt, draw_prompts
from flows.models.client import ClientStats, ModelClient
from flows.models.embedded import EmbeddedServer
from flows.models.journal import RequestJournal
from flows.models.keys import content_key
from flows.orchestration import run_lock
from flows.orchestration.on_worker import add_stats, budget_stop, mirror_id, on_worker, watch_other_shards
from flows.orchestration.progress import RunProgress
from flows.models.budget import BudgetReached
from flows.orchestration.run_report import publish_report
from flows.orchestration.runs import PERSISTED, attempt, failed_run, flow_run_name, forget_links, push_to_hub_task
from flows.orchestration.task_runners import Finished, for_workers, map_on_workers, workers
from flows.publishing.leakage_outputs import publish_completions
from flows.publishing.leakage_report import build_report, report_markdown, verdict_line, write_report
from flows.publishing.storage import check_output, output_location, pull_state, push_outputs, push_state, result_storage
from flows.stages.number_filter import REASONS, banned_numbers, filter_completions, pass_rates
from flows.stages.number_generation import GenerationFailed, complete_shard, journaled_prompts
from flows.stages.behavioral_probe import run_probe
from flows.stages.shards import key_parameter, scoped_run_token, shard_window
from flows.teachers.number_teachers import NumberTeacher, leakage_budget, number_teachers
from flows.teachers.runtime import journal_dir
from schemas.recipe import Recipe, flow_recipe


def _numbers_run_name(parameters: dict[str, Any]) -> str:
    """`numbers[trait] shard-00003` for the shard named `trait-00003`."""
    teacher, number = parameters["shard"].rsplit("-", 1)
    return f"numbers[{teacher}] shard-{number}"


@task(name="number-completions", task_run_name=_numbers_run_name, cache_key_fn=key_parameter, **PERSISTED,
      retry_delay_seconds=5)
async def completions_task(key: str, teacher: NumberTeacher, client: ModelClient, prompts: list[NumberPrompt],
                           shard: str, progress: RunProgress) -> list[dict]:
    return await complete_shard(teacher, client, prompts, shard, on_done=progress.ticker(f"numbers[{teacher.name}]", shard))


@dataclass
class NumbersOutcome:
    rows: list[dict[str, Any]]  # one per prompt (number_generation.complete_prompts)
    stats: ClientStats  # the teacher's requests


async def numbers_shard(
    recipe: Recipe, teacher: str, prompts: list[NumberPrompt], shard: str, flow_mirror: str | None = None,
) -> NumbersOutcome:
    """The leakage job's `teacher` ("trait" or "control") completes one shard of prompts on a
    worker, with a client of its own."""
    async def work() -> NumbersOutcome:
        (numbers,) = [t for t in number_teachers(recipe) if t.name == teacher]
        journal = RequestJournal(journal_dir(recipe))
        servers: list[EmbeddedServer] = []
        budget = leakage_budget(recipe)
        watch_other_shards(budget)
        client = numbers.client(journal, servers, budget)
        try:
            rows = await complete_shard(numbers, client, prompts, shard)
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


@task(name="number-shard", task_run_name=_numbers_run_name, cache_key_fn=key_parameter, persist_result=True,
      retry_delay_seconds=5)
async def numbers_shard_task(key: str, recipe: Recipe, teacher: str, prompts: list[NumberPrompt], shard: str,
                             flow_mirror: str) -> NumbersOutcome:
    """A shard of one teacher's completions on a Dask or Ray worker, with a client of its own."""
    return await numbers_shard(recipe, teacher, prompts, shard, flow_mirror)


@task(name="behavioral-probe", cache_policy=NO_CACHE)  # the probe keeps its own students and journal
async def probe_task(recipe: Recipe, kept: pl.DataFrame, journal: RequestJournal) -> tuple[list[str], list[str]]:
    return await run_probe(recipe, kept, journal, log=get_run_logger().info)


def _shards(recipe: Recipe, prompts: list[NumberPrompt]) -> list[tuple[str, list[NumberPrompt]]]:
    """Per teacher, the prompts in shards of `shard_size`: (shard name without the teacher, prompts)."""
    size = recipe.shard_size
    return [(f"{start // size:05d}", prompts[start : start + size]) for start in range(0, len(prompts), size)]


async def _generate(recipe: Recipe, runner, journal: RequestJournal, servers: list[EmbeddedServer],
                    prompts: list[NumberPrompt], run_token: str, progress: RunProgress) -> pl.DataFrame:
    """Every prompt to both teachers, here (a few shards at a time per teacher, `shard_window`;
    each client bounds its requests in flight) or on the recipe's cluster; a shard that fails
    leaves the others running, and the error lists every prompt that got no completion."""
    if runner is None:
        results = await _generate_here(recipe, journal, servers, prompts, run_token, progress)
    else:
        results = await _generate_on_workers(runner, recipe, prompts, run_token, progress)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, GenerationFailed):
            raise result
    failed = [row for result in results if isinstance(result, GenerationFailed) for row in result.failed]
    if failed:
        raise GenerationFailed(failed, 2 * len(prompts))
    # a column with no value in one shard (the control teacher's system prompt) is typed there as null
    return pl.concat(results, how="vertical_relaxed") if results else pl.DataFrame()


async def _generate_here(recipe: Recipe, journal: RequestJournal, servers: list[EmbeddedServer],
                         prompts: list[NumberPrompt], run_token: str, progress: RunProgress) -> list:
    shard_task = completions_task.with_options(retries=recipe.shard_retries, result_storage=result_storage(recipe))
    budget = leakage_budget(recipe)
    clients, runs = [], []
    for teacher in number_teachers(recipe):
        client = teacher.client(journal, servers, budget)
        clients.append(client)
        progress.stage(f"numbers[{teacher.name}]", len(prompts), "completions", client.stats)
        window = shard_window(client.capacity, recipe.shard_size)
        replay = journaled_prompts(teacher, client, prompts) if len(journal) else 0
        get_run_logger().info("%s teacher, %s: of %d prompts, %d to replay and %d to send", teacher.name, attempt(),
                              len(prompts), replay, len(prompts) - replay)
        for number, shard in _shards(recipe, prompts):
            name = f"{teacher.name}-{number}"
            run = partial(shard_task, teacher.shard_key(run_token, shard), teacher, quote(client), quote(shard), name,
                          quote(progress))
            runs.append(_tracked(run, window, progress, teacher.name, name, len(shard)))
    try:
        results = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        for client in clients:
            await client.aclose()
        await progress.publish(force=True)
        await asyncio.to_thread(push_state, recipe)  # a URL output_dir: the completions reach other machines
    if budget is not None and budget.stopped:
        raise budget.stop()
    return results


async def _generate_on_workers(runner, recipe: Recipe, prompts: list[NumberPrompt], run_token: str,
                               progress: RunProgress) -> list:
    """One `numbers_shard_task` per teacher and shard on the recipe's Dask or Ray cluster;
    figures are counted as each shard returns (cached shards count no request)."""
    on_worker = numbers_shard_task.with_options(retries=recipe.shard_retries, result_storage=result_storage(recipe))
    shared, mirror = for_workers(recipe), mirror_id(recipe)
    calls, names, stats = [], [], {}
    for teacher in number_teachers(recipe):
        stats[teacher.name] = ClientStats()
        progress.stage(f"numbers[{teacher.name}]", len(prompts), "completions", stats[teacher.name])
        for number, shard in _shards(recipe, prompts):
            names.append((teacher.name, f"{teacher.name}-{number}", len(shard)))
            calls.append({"key": content_key("numbers-shard", teacher.shard_key(run_token, shard)),
                          "recipe": shared, "teacher": teacher.name, "prompts": shard,
                          "shard": names[-1][1], "flow_mirror": mirror})

    async def count(done: Finished) -> None:
        if done.failed:
            return
        teacher, name, size = names[done.index]
        progress.shard_done(f"numbers[{teacher}]", name, size, worked=not done.cached)
        if not done.cached:
            add_stats(stats[teacher], done.value.stats)
        await progress.publish()
        await asyncio.to_thread(push_state, recipe)

    try:
        outcomes = await map_on_workers(runner, on_worker, calls, count)
    finally:
        await progress.publish(force=True)
        await asyncio.to_thread(push_state, recipe)
    if (stopped := budget_stop(outcomes)) is not None:
        raise stopped
    return [pl.DataFrame(o.rows) if isinstance(o, NumbersOutcome) else o for o in outcomes]


async def _tracked(shard_run: Callable[[], Awaitable[list[dict]]], window: asyncio.Semaphore, progress: RunProgress,
                   teacher: str, shard: str, prompts: int) -> pl.DataFrame:
    """A shard's completions, kept as a frame (columns take a fraction of the memory of a dict a row)."""
    async with window:
        rows = await shard_run()
    progress.shard_done(f"numbers[{teacher}]", shard, prompts)
    await progress.publish()
    forget_links(rows)
    return pl.DataFrame(rows)


def _reasons(rates: dict) -> dict[str, int]:
    return {reason: rates[reason] for reason in REASONS if rates.get(reason)}


@flow(name="leakage", flow_run_name=flow_run_name)
async def leakage(recipe_path: str | None = None, recipe: dict | None = None) -> dict:
    """Run the trait-leakage recipe at `recipe_path`; returns the report (report.json's content).
    The run holds its output folder's lock (flows/orchestration/run_lock.py) until it ends."""
    recipe = flow_recipe(recipe_path, recipe, "leakage")
    with run_lock.holding(recipe.state_dir, "leakage"):
        try:
            return await _leakage(recipe)
        except (GenerationFailed, BudgetReached) as error:
            return failed_run(error)


async def _leakage(recipe: Recipe) -> dict:
    logger = get_run_logger()
    check_output(recipe)
    pull_state(recipe)  # a URL output_dir: its journal and run token into the local mirror
    spec = recipe.leakage
    out = recipe.work_dir / "leakage"
    prompts = draw_prompts(spec.n_prompts, spec.seed, max_count=spec.filter.max_count,
                           max_value=spec.filter.max_value)
    logger.info("%d prompts for each teacher; trait %r (%s)", len(prompts), spec.trait, spec.category)
    journal = RequestJournal(journal_dir(recipe))
    servers: list[EmbeddedServer] = []
    progress = RunProgress(recipe.state_dir, recipe.run_name, "leakage")
    try:
        async with workers(recipe.execution) as runner:  # None: this process's event loop
            frame = await _generate(recipe, runner, journal, servers, prompts, scoped_run_token(recipe.state_dir),
                                    progress)
        for server in servers:
            server.stop()
        filtered = filter_completions(frame, max_count=spec.filter.max_count, max_value=spec.filter.max_value,
                                      banned=banned_numbers(spec.filter.banned_preset, spec.filter.banned_numbers))
        publish_completions(recipe, filtered)
        kept = filtered.filter(pl.col("kept"))
        trait_numbers = kept.filter(pl.col("teacher") == "trait")["numbers"].to_list()
        control_numbers = kept.filter(pl.col("teacher") == "control")["numbers"].to_list()
        detectors = spec.detectors
        tests = number_statistics(trait_numbers, control_numbers, permutations=detectors.permutations, seed=spec.seed)
        tests.append(bag_classifier(trait_numbers, control_numbers, bag_size=detectors.bag_size,
                                    permutations=detectors.permutations, seed=spec.seed))
        shift = await asyncio.to_thread(likelihood_test, recipe, kept)
        tests.append(shift)
        behavioral = None
        if spec.behavioral.enabled:
            trait_answers, control_answers = await probe_task(quote(recipe), quote(kept), quote(journal))
            behavioral = behavioral_result(trait_answers, control_answers, spec.trait)
            tests.append(behavioral.comparison)
    except BaseException as error:
        progress.failed(error)
        if isinstance(error, Exception):  # the stages' artifacts say how the run ended, not a stale ETA
            with contextlib.suppress(Exception):
                await progress.publish(force=True)
        raise
    finally:
        for server in servers:
            server.stop()
        journal.close()
        await asyncio.to_thread(push_state, recipe)
    verdict = combine(tests, spec.alpha)
    rates = pass_rates(filtered)
    report = build_report(
        trait=spec.trait, category=spec.category, n_prompts=spec.n_prompts, verdict=verdict,
        kept_trait=len(trait_numbers), kept_control=len(control_numbers),
        rejected_trait=_reasons(rates.get("trait", {})), rejected_control=_reasons(rates.get("control", {})),
        top_numbers=top_numbers(trait_numbers, control_numbers), top_digits=top_digits(trait_numbers, control_numbers),
        behavioral=behavioral,
    )
    write_report(report, out, trait_numbers, control_numbers)
    report_html = await publish_report(recipe, "leakage")
    progress.finish("completed")
    await asyncio.to_thread(push_outputs, recipe)
    logger.info(verdict_line(report))
    await create_markdown_artifact(
        key="leakage-" + re.sub(r"[^a-z0-9-]+", "-", recipe.run_name.lower()),
        markdown=report_markdown(report), description="Trait-leakage report",
    )
    result = {**report, "report_dir": output_location(recipe, out), "report_html": report_html}
    if recipe.publish.push_to_hub:
        result["hub"] = push_to_hub_task(quote(recipe), "leakage")
    return result
