"""Self-distillation stage logic: student samples → picks → teacher parts → examples.

A picked sample is `verification` (a correct sample, verified by the *other* strategy) or
`correction` (an incorrect sample, followed by a correct teacher solution). The other
strategy of a sample that ran code is text reasoning (the reasoning teacher), and of one
that ran none, code (the tool-using teacher). Examples are stitched exactly like DualDistill
composites (`stitch_pair`): verification = `both_correct` (the student's attempt is
trained), correction = `second_corrects` (the attempt is masked: `mask_until`).

The teacher part is `generate`d (the teacher answers now; a wrong answer rejects the pick
with the grader's reason) or `reuse`d (a correct trajectory of the right strategy from a
DualDistill run's `trajectories/`, as the reference code does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from flows.grading import Grader
from flows.inputs.prompts import PromptFile, load_prompt
from flows.models.client import ClientStats
from flows.stages.selection import problem_stats, select
from flows.stages.shards import answer_shard, grade_shard, shard_name
from flows.stages.stitching import stitch_pair
from schemas.recipe import Recipe, SelfDistillSpec
from schemas.records import (
    Composite,
    GradedTrajectory,
    Problem,
    SelfDistillExample,
    SelfDistillRejected,
    TeacherRole,
)

if TYPE_CHECKING:
    from flows.publishing.rounds import RowFigures
    from flows.teachers.students import StudentRuntime

TeacherKey = tuple[str, TeacherRole]  # (problem id, strategy)


def strategy(sample: GradedTrajectory) -> TeacherRole:
    return "tool" if sample.tool_calls > 0 else "reasoning"


def other(role: TeacherRole) -> TeacherRole:
    return "reasoning" if role == "tool" else "tool"


def samples_frame(samples: Sequence[GradedTrajectory]) -> pl.DataFrame:
    """The columns selection reads, one row per graded sample."""
    return pl.DataFrame(
        {
            "problem_id": [s.problem_id for s in samples],
            "sample": [s.sample for s in samples],
            "correct": [s.correct for s in samples],
            "ran_code": [s.tool_calls > 0 for s in samples],
            "text": [s.text for s in samples],
            "confidence": [s.confidence for s in samples],
            "lowest_window": [s.lowest_window for s in samples],
        },
        schema={"problem_id": pl.String, "sample": pl.Int64, "correct": pl.Boolean, "ran_code": pl.Boolean,
                "text": pl.String, "confidence": pl.Float64, "lowest_window": pl.Float64},
    )


@dataclass
class Picks:
    """A shard's graded samples, selected: what the teacher part and the examples are built from."""

    stats: pl.DataFrame  # per problem: samples, correct ones, mean score (problem_stats)
    picks: pl.DataFrame  # the picked samples (selection.PICK_COLUMNS)
    by_sample: dict[tuple[str, int], GradedTrajectory]
    needed: list[TeacherKey]  # the teacher parts the picks need


def pick_samples(graded: Sequence[GradedTrajectory], spec: SelfDistillSpec) -> Picks:
    """Select among a shard's graded samples by the β rules, and name the teacher parts needed."""
    frame = samples_frame(graded)
    picks = select(frame, beta1=spec.beta1, beta2=spec.beta2, rule=spec.rule, pick=spec.pick, seed=spec.seed)
    by_sample = {(g.problem_id, g.sample): g for g in graded}
    return Picks(problem_stats(frame), picks, by_sample, needed_teacher_parts(picks, by_sample))


def examples_of(
    picked: Picks, teacher_parts: Mapping[TeacherKey, GradedTrajectory | str], problems: Sequence[Problem],
    spec: SelfDistillSpec, round_number: int, system_prompt: str | None,
) -> tuple[list[SelfDistillExample], list[SelfDistillRejected]]:
    """`build_examples` for a shard, with the recipe's transitions and pick."""
    return build_examples(picked.picks, picked.by_sample, teacher_parts, {p.id: p for p in problems},
                          load_prompt(spec.transitions), round_number=round_number, pick=spec.pick,
                          system_prompt=system_prompt)


def needed_teacher_parts(picks: pl.DataFrame, samples: Mapping[tuple[str, int], GradedTrajectory]) -> list[TeacherKey]:
    """Which (problem, strategy) solutions the picks need, each once, in pick order."""
    keys = (
        (problem_id, other(strategy(samples[(problem_id, sample)])))
        for problem_id, sample in picks.select("problem_id", "sample").iter_rows()
    )
    return list(dict.fromkeys(keys))


def reuse_index(folder: Path) -> dict[TeacherKey, GradedTrajectory]:
    """Correct trajectories of a DualDistill run's `trajectories/` dataset, by (problem, teacher)."""
    files = sorted((folder / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no data/*.parquet; `reuse_from` must name a DualDistill trajectories/ folder")
    frame = pl.read_parquet(files).filter(pl.col("correct"))
    index: dict[TeacherKey, GradedTrajectory] = {}
    for row in frame.iter_rows(named=True):
        index.setdefault((row["problem_id"], row["teacher"]), GradedTrajectory.model_validate(row))
    return index


def build_examples(
    picks: pl.DataFrame,
    samples: Mapping[tuple[str, int], GradedTrajectory],
    teacher_parts: Mapping[TeacherKey, GradedTrajectory | str],
    problems: Mapping[str, Problem],
    transitions: PromptFile,
    *,
    round_number: int,
    pick: str,
    system_prompt: str | None = None,
) -> tuple[list[SelfDistillExample], list[SelfDistillRejected]]:
    """One example per pick whose teacher part is a correct solution; the others rejected.

    `teacher_parts` maps each needed (problem, strategy) to a correct graded solution, or
    to the reason there is none.
    """
    examples: list[SelfDistillExample] = []
    rejected: list[SelfDistillRejected] = []
    for row in picks.iter_rows(named=True):
        sample = samples[(row["problem_id"], row["sample"])]
        student_role = strategy(sample)
        part = teacher_parts.get((row["problem_id"], other(student_role)), "no teacher part was produced")
        if isinstance(part, str):
            rejected.append(SelfDistillRejected(
                id=row["problem_id"], round=round_number, kind=row["kind"], sample=row["sample"], reason=part,
                student_text=sample.text, teacher_text="",
            ))
            continue
        # stitched as a DualDistill pair whose first answer is the student's
        stitched = stitch_pair(problems[row["problem_id"]], sample.model_copy(update={"teacher": student_role}),
                               part, transitions, system_prompt)
        assert isinstance(stitched, Composite)  # the teacher part is correct: never both_wrong
        examples.append(SelfDistillExample(
            id=row["problem_id"], problem=stitched.problem, answer=stitched.answer, round=round_number,
            kind=row["kind"], k=row["k"], n_correct=row["n_correct"], mean_score=row["mean_score"],
            sample=row["sample"], pick=pick, confidence=sample.confidence,
            student_strategy=student_role, teacher_strategy=other(student_role), transition=stitched.transition,
            student_text=sample.text, teacher_text=part.text, text=stitched.text, messages=stitched.messages,
            mask_until=stitched.mask_until, student_model=sample.model, teacher_model=part.model,
        ))
    return examples, rejected


@dataclass
class RoundShardOutcome:
    graded: list[GradedTrajectory]  # every graded sample
    stats: pl.DataFrame  # per problem (selection.problem_stats)
    examples: list[SelfDistillExample]
    rejected: list[SelfDistillRejected]
    sampled: ClientStats  # the student's request figures when the shard ended
    rows: RowFigures | None = None  # once the rows above are spooled (and emptied): what the summary needs of them


async def sample_select_complete(
    recipe: Recipe, runtime: StudentRuntime, grader: Grader, round_number: int, index: int, problems: list[Problem],
    on_sample: Callable[[], None] | None = None,
) -> RoundShardOutcome:
    """One shard of a round, start to end, the one copy of the job's pipeline: the student
    samples K per problem, the samples are graded and picked (β rules), the picks get their
    teacher parts (generated or reused), and the examples are stitched. `on_sample` is called
    as each sample finishes (progress)."""
    spec = recipe.self_distill
    shard = f"r{round_number}-{shard_name(index)}"
    samples = await answer_shard(runtime.student, problems, shard, runtime.slots(), samples=spec.k, on_done=on_sample)
    graded = await asyncio.to_thread(grade_shard, samples, problems, grader, recipe.system_prompt)
    picked = pick_samples(graded, spec)
    parts = await teacher_parts(runtime, picked.needed, problems, grader, shard)
    examples, rejected = examples_of(picked, parts, problems, spec, round_number, recipe.system_prompt)
    return RoundShardOutcome(graded, picked.stats, examples, rejected, runtime.student.client.stats)


async def teacher_parts(
    runtime: StudentRuntime, needed: Sequence[TeacherKey], problems: Sequence[Problem], grader: Grader, shard: str
) -> dict[TeacherKey, GradedTrajectory | str]:
    """A correct solution per needed (problem, strategy) — reused, or answered now by the
    runtime's teacher of that strategy and graded — or the reason there is none."""
    if runtime.reused is not None:
        return {key: runtime.reused.get(key, f"no correct {key[1]} trajectory of {key[0]} to reuse") for key in needed}
    by_id = {p.id: p for p in problems}
    parts: dict[TeacherKey, GradedTrajectory | str] = {}
    for role in ("tool", "reasoning"):
        wanted = [by_id[problem_id] for problem_id, strategy in needed if strategy == role]
        if not wanted:
            continue
        answers = await answer_shard(runtime.teachers[role], wanted, shard)
        graded = await asyncio.to_thread(grade_shard, answers, wanted, grader)
        for answer in graded:
            parts[(answer.problem_id, role)] = answer if answer.correct else (
                f"the {role} teacher's solution was wrong: {answer.grade_reason}")
    return parts
