"""Self-distillation rounds: the student's own samples become verification / correction data.

In:  a recipe YAML with `problems`, `student` (any backend: endpoint, embedded, transformers),
     `self_distill` (k, beta1, beta2, rule, pick, rounds, teacher_part, trainer) and, to
     generate the teacher part, `teachers` (see recipes/self_distill_demo.yaml).
Out: under `output_dir/self_distill/`, per round r: `round-{r}/` (the SFT rows, with
     `train_detail`), `round-{r}-samples/` (every graded sample), `round-{r}-rejected/`
     (picks with no usable teacher part, with the reason); `summary.json`, `accuracy.png`
     and a Prefect markdown artifact; with a trainer, `round-{r}-model/` (or whatever the
     `command` trainer names) is the next round's student.
Run: `distillery self-distill recipes/self_distill_demo.yaml`.

Per round, per shard: sample K per problem (the tool-using loop) → grade → select (β
rules) → teacher part (generate or reuse) → examples; then publish, summarise, train.
Every request is journaled and stages are cached by content, so a rerun sends only what
is missing; a finished round (its datasets and its trained student) is not redone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.annotations import quote

from flows.grading import GRADER_VERSION, Grader
from flows.inputs.problems import load_problems
from flows.inputs.prompts import load_prompt
from flows.publishing.rounds import RoundSummary, plot_accuracy, summarise_round, summary_markdown
from flows.publishing.self_distill_outputs import publish_round
from flows.publishing.storage import check_output, output_location, pull_state, push_outputs, push_state, result_storage
from flows.stages.selection import problem_stats, round_stats, select
from flows.stages.self_distillation import build_examples, needed_teacher_parts, reuse_index, samples_frame
from flows.orchestration.progress import RunProgress
from flows.orchestration.runs import flow_run_name, push_to_hub_task
from flows.stages.shards import answer_shard, content_key, grade_shard, key_parameter, scoped_run_token, shard_name, split_shards
from flows.teachers.students import (
    StudentRuntime,
    build_student_runtime,
    student_name,
    student_scope,
    teacher_scope,
    trained_student,
)
from flows.training.trainers import make_trainer
from schemas.recipe import Recipe, StudentSpec, flow_recipe
from schemas.records import GradedTrajectory, Problem, SelfDistillExample, SelfDistillRejected

STAGE_VERSION = "1"


@task(name="sample-shard", cache_key_fn=key_parameter, persist_result=True, retries=1, retry_delay_seconds=5)
async def sample_task(key: str, runtime: StudentRuntime, shard: str, problems: list[Problem], k: int,
                      progress: RunProgress, stage: str):
    return await answer_shard(runtime.student, problems, shard, runtime.slots(), samples=k,
                              on_done=progress.ticker(stage, shard))


@task(name="grade-samples", cache_key_fn=key_parameter, persist_result=True)
async def grade_task(key: str, grader: Grader, samples, problems: list[Problem], system_prompt: str | None):
    return await asyncio.to_thread(grade_shard, samples, problems, grader, system_prompt)


@task(name="teacher-part", cache_key_fn=key_parameter, persist_result=True, retries=1, retry_delay_seconds=5)
async def teacher_part_task(key: str, runtime: StudentRuntime, grader: Grader, shard: str, needed, problems):
    return await runtime.teacher_parts(needed, problems, grader, shard)


@task(name="train-student")
def train_task(recipe: Recipe, round_number: int, dataset: str, student: str) -> str:
    logger = get_run_logger()
    trainer = make_trainer(recipe.self_distill.trainer)
    output = recipe.work_dir / "self_distill" / f"round-{round_number}-model"
    return trainer.train(dataset=Path(dataset), round=round_number, student=student, output=output, log=logger.info)


async def _shard(recipe: Recipe, runtime: StudentRuntime, grader: Grader, progress: RunProgress, scope: str,
                 index: int, problems: list[Problem], round_number: int):
    spec = recipe.self_distill
    shard = f"r{round_number}-{shard_name(index)}"
    storage = result_storage(recipe)  # None: Prefect's default; for a URL output_dir, beside the journal
    sample, grade, teacher_part = (stage.with_options(result_storage=storage)
                                   for stage in (sample_task, grade_task, teacher_part_task))
    sample_key = content_key(scope, "sample", content_key(*problems))
    samples = await sample(sample_key, quote(runtime), shard, quote(problems), spec.k, quote(progress),
                           f"sample[r{round_number}]")
    progress.shard_done(f"sample[r{round_number}]", shard, len(samples))
    grade_key = content_key(sample_key, "grade", GRADER_VERSION, recipe.system_prompt)
    graded: list[GradedTrajectory] = await grade(grade_key, quote(grader), quote(samples), quote(problems),
                                                 recipe.system_prompt)
    frame = samples_frame(graded)
    stats = problem_stats(frame)
    picks = select(frame, beta1=spec.beta1, beta2=spec.beta2, rule=spec.rule, pick=spec.pick, seed=spec.seed)
    by_sample = {(g.problem_id, g.sample): g for g in graded}
    needed = needed_teacher_parts(picks, by_sample)
    part_key = content_key(grade_key, "teacher-part", spec.teacher_part, needed, runtime.teacher_scope)
    parts = await teacher_part(part_key, quote(runtime), quote(grader), shard, needed, quote(problems))
    progress.shard_done(f"grade + teacher part[r{round_number}]", shard, len(problems), worked=True)
    await progress.publish()
    await asyncio.to_thread(push_state, recipe)  # a URL output_dir: this shard's answers reach other machines
    examples, rejected = build_examples(
        picks, by_sample, parts, {p.id: p for p in problems}, load_prompt(spec.transitions),
        round_number=round_number, pick=spec.pick, system_prompt=recipe.system_prompt,
    )
    return graded, stats, examples, rejected


async def _round(recipe: Recipe, runtime: StudentRuntime, grader: Grader, progress: RunProgress,
                 shards: list[list[Problem]], round_number: int, run_token: str) -> RoundSummary:
    started = time.perf_counter()
    problems = sum(len(shard) for shard in shards)
    progress.stage(f"sample[r{round_number}]", problems * recipe.self_distill.k, "samples",
                   runtime.student.client.stats)
    progress.stage(f"grade + teacher part[r{round_number}]", problems, "problems")
    scope = content_key("self-distill", STAGE_VERSION, run_token, round_number, runtime.student_scope,
                        recipe.self_distill.k)
    outcomes = await asyncio.gather(
        *(_shard(recipe, runtime, grader, progress, scope, i, shard, round_number)
          for i, shard in enumerate(shards)),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await progress.publish(force=True)
    if failures:
        if runtime.budget is not None and runtime.budget.stopped:
            raise runtime.budget.stop()
        raise RuntimeError(f"round {round_number}: {len(failures)} shard(s) failed; answers so far are journaled, "
                           f"rerun to resume. First: {type(failures[0]).__name__}: {failures[0]}")
    graded = [g for gs, _, _, _ in outcomes for g in gs]
    examples: list[SelfDistillExample] = [e for _, _, es, _ in outcomes for e in es]
    rejected: list[SelfDistillRejected] = [r for _, _, _, rs in outcomes for r in rs]
    summary = summarise_round(round_number, runtime.student.client.model, round_stats(pl.concat(
        [s for _, s, _, _ in outcomes])), graded, examples, rejected, sent=runtime.student.client.stats.sent)
    summary.datasets = publish_round(recipe, summary, examples, graded, rejected)
    summary.wall_s = round(time.perf_counter() - started, 2)
    return summary


def _located(recipe: Recipe, summary: RoundSummary) -> dict:
    """A round's summary with its datasets and student where the user finds them (URLs for a URL output_dir)."""
    located = summary.to_dict()
    located["datasets"] = {name: output_location(recipe, path) for name, path in summary.datasets.items()}
    if summary.next_student:
        located["next_student"] = output_location(recipe, summary.next_student)
    return located


@flow(name="self-distill", flow_run_name=flow_run_name)
async def self_distill(recipe_path: str | None = None, recipe: dict | None = None) -> dict:
    """Run the self-distillation recipe at `recipe_path`; returns the per-round summaries."""
    logger = get_run_logger()
    recipe = flow_recipe(recipe_path, recipe, "self_distill")
    check_output(recipe)
    pull_state(recipe)  # a URL output_dir: its journal, run token and finished rounds into the local mirror
    problems = load_problems(recipe.problems)
    shards = split_shards(problems, recipe.shard_size)
    spec = recipe.self_distill
    logger.info("%d problems, K=%d, %d round(s), teacher part: %s", len(problems), spec.k, spec.rounds,
                spec.teacher_part)
    out = recipe.work_dir / "self_distill"
    state = recipe.state_dir / "self_distill"
    state.mkdir(parents=True, exist_ok=True)
    run_token = scoped_run_token(recipe.state_dir)
    reused = reuse_index(spec.reuse_from) if spec.teacher_part == "reuse" else None
    student: StudentSpec = recipe.student
    rounds: list[RoundSummary] = []
    grader = Grader(workers=1)
    progress = RunProgress(recipe.state_dir, recipe.run_name, "self_distill")
    try:
        for round_number in range(1, spec.rounds + 1):
            done = state / f"round-{round_number}.json"
            # what a round's datasets and trained student depend on: not how many rounds follow, nor URLs
            fingerprint = content_key(run_token, spec.model_dump(exclude={"rounds"}), student_scope(recipe, student),
                                      teacher_scope(recipe, reused), recipe.problems, recipe.system_prompt)
            if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
                summary = RoundSummary(**json.loads(done.read_text())["summary"])
                logger.info("round %d finished earlier; skipped", round_number)
            else:
                runtime = build_student_runtime(recipe, student, reused)
                try:
                    summary = await _round(recipe, runtime, grader, progress, shards, round_number, run_token)
                finally:
                    await runtime.aclose()
                if spec.trainer.kind != "none":
                    summary.next_student = train_task(quote(recipe), round_number, summary.datasets["examples"],
                                                      student_name(student))
                done.write_text(json.dumps({"fingerprint": fingerprint, "summary": summary.to_dict()}, indent=2))
                await asyncio.to_thread(push_outputs, recipe)  # a URL output_dir: the round's datasets, with its marker
            if warning := summary.duplicate_warning:
                logger.warning("round %d: %s", round_number, warning)
            rounds.append(summary)
            if summary.next_student:
                student = trained_student(student, summary.next_student)
    except BaseException:
        progress.finish("failed")
        raise
    finally:
        grader.close()
        await asyncio.to_thread(push_state, recipe)
    progress.finish("completed")
    plot_accuracy(rounds, out / "accuracy.png")
    result = {"run_name": recipe.run_name, "rounds": [_located(recipe, r) for r in rounds],
              "plot": output_location(recipe, out / "accuracy.png"), "grader": GRADER_VERSION}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    await asyncio.to_thread(push_outputs, recipe)
    await create_markdown_artifact(
        key="self-distill-" + re.sub(r"[^a-z0-9-]+", "-", recipe.run_name.lower()),
        markdown=summary_markdown(recipe.run_name, rounds), description="Self-distillation rounds",
    )
    if recipe.publish.push_to_hub:
        result["hub"] = push_to_hub_task(quote(recipe), "self_distill")
    return result
