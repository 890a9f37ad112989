"""Shard-level stage logic, plain functions testable without Prefect.

A shard is a list of problems; inside it every problem's requests run
concurrently (each endpoint's client bounds how many are in flight). A problem
whose request still fails after its retries fails the shard, but only after the
shard's other problems have finished, so their answers are already journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.grading import Grader
from flows.teachers.reasoning import ReasoningTeacher
from flows.teachers.tool import ToolTeacher
from flows.training.masks import sft_messages, untrained_ranges
from schemas.records import GradedTrajectory, Problem, Trajectory, Verdict

_THINK_CLOSE = "</think>"


class ShardFailed(RuntimeError):
    """Some problems of a shard could not be answered; the message says which and why."""

    def __init__(self, stage: str, shard: str, errors: list[tuple[str, BaseException]], total: int) -> None:
        first_id, first_error = errors[0]
        super().__init__(
            f"stage {stage}, {shard}: {len(errors)} of {total} problem(s) failed; "
            f"first: problem {first_id}: {first_error}"
        )
        self.stage = stage
        self.shard = shard
        self.errors = errors


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shards_at_once(in_flight: int, shard_size: int) -> int:
    """How many shards one role answers at once, for `in_flight` problems under way: enough
    waiting problems to refill every slot while a shard finishes, so the endpoint never idles,
    and no more. Shards then start at once instead of setting up their Prefect task runs in
    lockstep (2.5 s before the first request with 40 shards), and finish, and are graded,
    in order rather than all at the end."""
    return max(2, -(-2 * in_flight // shard_size) + 1)


def shard_window(in_flight: int, shard_size: int) -> asyncio.Semaphore:
    """A semaphore of `shards_at_once` slots."""
    return asyncio.Semaphore(shards_at_once(in_flight, shard_size))


def scoped_run_token(state_dir: Path) -> str:
    """Scopes cached stage results to this output folder's life: delete the folder
    (journal included) and the next run starts from scratch, cache included."""
    path = state_dir / "run-token"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


def key_parameter(context, parameters) -> str:  # noqa: ANN001 - Prefect's cache_key_fn signature
    """Prefect cache key of a stage task: its `key` parameter, a `content_key` of its inputs
    (flows/models/keys.py)."""
    return parameters["key"]


async def answer_shard(
    teacher: ToolTeacher | ReasoningTeacher,
    problems: Sequence[Problem],
    shard: str,
    slots: asyncio.Semaphore | None = None,
    samples: int = 1,
    on_done: Callable[[], None] | None = None,
) -> list[Trajectory]:
    """`samples` trajectories per problem (sample i is sent with seed + i), in problem then
    sample order.

    `slots` (shared by all shards of a teacher) bounds how many samples are under way:
    a sample keeps its slot through all its turns, so samples finish in the order they
    started and early shards complete early, instead of every sample's second turn
    queueing behind every other sample's first. `on_done` is called as each sample
    finishes (progress reporting).
    """
    work = [(problem, sample) for problem in problems for sample in range(samples)]

    async def solve(problem: Problem, sample: int) -> Trajectory:
        async with slots or contextlib.nullcontext():
            trajectory = await teacher.solve(problem, shard=f"{teacher.role}-{shard}", sample=sample)
        if on_done is not None:
            on_done()
        return trajectory

    results = await asyncio.gather(*(solve(*item) for item in work), return_exceptions=True)
    errors = [(p.id, r) for (p, _), r in zip(work, results, strict=True) if isinstance(r, BaseException)]
    if errors:
        raise ShardFailed(f"answer[{teacher.role}]", shard, errors, len(work))
    return list(results)  # type: ignore[arg-type]


def journaled_first_requests(teacher: ToolTeacher | ReasoningTeacher, problems: Sequence[Problem],
                             samples: int = 1) -> int:
    """How many of the `samples` trajectories per problem would replay their first request
    from the journal (`answer_shard` sends the others)."""
    return sum(teacher.first_request_journaled(problem, sample) for problem in problems for sample in range(samples))


def unfinished_trace(trajectory: Trajectory) -> Verdict | None:
    """A wrong verdict for an answer that never finished, before anything is extracted:
    text cut by `max_tokens` may hold a half-revised answer, and a value that only
    appears inside `<think>` is not an answer."""
    if trajectory.finish_reason == "length":
        reason = "truncated: cut by max_tokens (finish_reason=length)"
    elif trajectory.finish_reason == "tool_limit":
        reason = f"tool_limit: still writing code after {trajectory.tool_calls} runs, no answer"
    elif _THINK_CLOSE in trajectory.text and not trajectory.text.rsplit(_THINK_CLOSE, 1)[1].strip():
        reason = "empty_content: the reply held reasoning only, nothing after </think>"
    else:
        return None
    return Verdict(correct=False, extracted=None, reason=reason, method="rule", parse_status="not_needed")


def grade_shard(
    trajectories: Sequence[Trajectory], problems: Sequence[Problem], grader: Grader, system_prompt: str | None = None
) -> list[GradedTrajectory]:
    """Grade every answer; each graded row also carries its own SFT `messages` and
    math-verify's verdict alone (`math_verify_correct`, the grader audit's second opinion)."""
    by_id = {p.id: p for p in problems}
    early = [unfinished_trace(t) for t in trajectories]
    pending = [(t.text, by_id[t.problem_id].answer) for t, v in zip(trajectories, early, strict=True) if v is None]
    graded = iter(grader.grade_many(pending))
    verdicts = [v if v is not None else next(graded) for v in early]
    second = grader.second_opinions([(t.text, by_id[t.problem_id].answer) for t in trajectories])
    return [
        GradedTrajectory(
            **t.model_dump(), correct=v.correct, extracted=v.extracted, grade_reason=v.reason,
            grade_method=v.method, parse_status=v.parse_status, math_verify_correct=mv,
            messages=sft_messages(by_id[t.problem_id].problem, t.text, untrained_ranges(t.tool_spans), system_prompt),
        )
        for t, v, mv in zip(trajectories, verdicts, second, strict=True)
    ]
