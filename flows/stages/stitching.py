"""Stitch two graded answers into one composite trajectory (DualDistill).

| g1 | g2 | composite                          | case             |
|----|----|------------------------------------|------------------|
| 1  | 1  | y1 + verification + y2             | both_correct     |
| 1  | 0  | y1 alone                           | first_correct    |
| 0  | 1  | y1 + correction + y2               | second_corrects  |
| 0  | 0  | dropped, kept in rejected/         | both_wrong       |

When y2 follows y1, y1's `<answer>` tags are unwrapped (its content stays; tags that a
program printed inside `<executor>` stay as they are), so a composite holds exactly one
`<answer>` block: the final one. In `second_corrects` everything before the transition
is the failed attempt: `mask_until` counts those characters so training never imitates
them. The assistant turn of `messages` carries `train_detail` (flows/training/masks.py):
besides that failed attempt, executor output and failed code blocks are not trained.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Literal

from flows.inputs.prompts import PromptFile
from flows.training.masks import Range, sft_messages, untrained_ranges
from schemas.records import CaseLabel, Composite, GradedTrajectory, Problem, Rejected, TeacherRole, ToolSpan

Order = Literal["tool_first", "reasoning_first", "random", "both"]
SEPARATOR = "\n\n"
_ANSWER_TAGS = re.compile(r"</?answer>")


def case_of(g1: bool, g2: bool) -> CaseLabel:
    if g1:
        return "both_correct" if g2 else "first_correct"
    return "second_corrects" if g2 else "both_wrong"


def first_teachers(order: Order, problem_id: str, seed: int = 0) -> list[TeacherRole]:
    """Which teacher goes first for this problem (two entries for `both`)."""
    if order == "tool_first":
        return ["tool"]
    if order == "reasoning_first":
        return ["reasoning"]
    if order == "both":
        return ["tool", "reasoning"]
    # random: a coin per problem that depends only on (seed, id), so reruns agree
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return ["tool" if digest[0] % 2 == 0 else "reasoning"]


def transition_for(transitions: PromptFile, case: CaseLabel, first: TeacherRole) -> str:
    phrases = transitions.data.get("phrases", {})
    try:
        return str(phrases[case][first])
    except KeyError:
        raise KeyError(f"prompts/{transitions.name}.yaml: no phrase for case {case!r}, first teacher {first!r}") from None


def stitch_pair(
    problem: Problem,
    first: GradedTrajectory,
    second: GradedTrajectory,
    transitions: PromptFile,
    system_prompt: str | None = None,
) -> Composite | Rejected:
    case = case_of(first.correct, second.correct)
    if case == "both_wrong":
        return Rejected(
            id=problem.id, problem=problem.problem, answer=problem.answer, first_teacher=first.teacher,
            g1=False, g2=False, case=case,
            reason=f"both_wrong: {first.teacher}: {first.grade_reason}; {second.teacher}: {second.grade_reason}",
            first_text=first.text, second_text=second.text,
            first_extracted=first.extracted, second_extracted=second.extracted,
        )
    if case == "first_correct":
        transition, text, mask_until = "", first.text, 0
        untrained = untrained_ranges(first.tool_spans)
    else:
        transition = transition_for(transitions, case, first.teacher)
        unwrapped, first_spans = unwrap_answers(first.text, first.tool_spans)
        head = unwrapped.rstrip() + SEPARATOR
        text = head + transition + SEPARATOR + second.text
        mask_until = len(head) if case == "second_corrects" else 0
        offset = len(text) - len(second.text)
        untrained = [(0, mask_until)] + untrained_ranges(first_spans) + [
            (start + offset, end + offset) for start, end in untrained_ranges(second.tool_spans)
        ]
    messages = sft_messages(problem.problem, text, untrained, system_prompt)
    return Composite(
        id=problem.id, problem=problem.problem, answer=problem.answer,
        first_teacher=first.teacher, second_teacher=second.teacher,
        g1=first.correct, g2=second.correct, case=case, transition=transition,
        text=text, messages=messages, mask_until=mask_until,
        first_model=first.model, second_model=second.model,
    )


def unwrap_answers(text: str, spans: list[ToolSpan]) -> tuple[str, list[ToolSpan]]:
    """`text` without its `<answer>` tags outside code and executor blocks, and the spans
    moved to match."""
    removed: list[Range] = [
        m.span() for m in _ANSWER_TAGS.finditer(text) if not any(s.start <= m.start() < s.end for s in spans)
    ]

    def moved(position: int) -> int:
        return position - sum(end - start for start, end in removed if end <= position)

    kept, position = [], 0
    for start, end in removed:
        kept.append(text[position:start])
        position = end
    kept.append(text[position:])
    return "".join(kept), [s.model_copy(update={"start": moved(s.start), "end": moved(s.end)}) for s in spans]


def stitch_shard(
    problems: Iterable[Problem],
    graded: Iterable[GradedTrajectory],
    transitions: PromptFile,
    order: Order,
    seed: int = 0,
    system_prompt: str | None = None,
) -> tuple[list[Composite], list[Rejected]]:
    """Composites and rejected rows for a shard, in problem order."""
    by_key = {(g.problem_id, g.teacher): g for g in graded}
    composites: list[Composite] = []
    rejected: list[Rejected] = []
    for problem in problems:
        rejected_already = False
        for first_role in first_teachers(order, problem.id, seed):
            second_role: TeacherRole = "reasoning" if first_role == "tool" else "tool"
            try:
                first, second = by_key[(problem.id, first_role)], by_key[(problem.id, second_role)]
            except KeyError as missing:
                raise KeyError(f"problem {problem.id}: no graded {missing.args[0][1]} answer to stitch") from None
            row = stitch_pair(problem, first, second, transitions, system_prompt)
            if isinstance(row, Composite):
                composites.append(row)
            elif not rejected_already:  # with order `both`, a dropped pair is kept once
                rejected.append(row)
                rejected_already = True
    return composites, rejected
