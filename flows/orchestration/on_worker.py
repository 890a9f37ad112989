"""Shards on a Dask or Ray worker, and what every such shard shares with the flow.

- `dualdistill_shard`, `round_shard`, `numbers_shard`: a shard of each job as a flow's task
  runs it. On the flow's own event loop (`execution: threads`) the shard uses the flow's
  runtime; on a worker, nothing of the flow's process is there (live clients, the sandbox,
  embedded servers, the progress file), so it builds its own clients from the recipe on the
  shared journal folder, runs the same stage function (flows/stages/dualdistill_shard.py,
  flows/stages/self_distillation.py, the number teachers' `complete`), closes everything and
  returns picklable records. Each worker-side shard has its own clients, so the recipe's
  `max_concurrency` holds per shard in flight (per worker on a local cluster). Answers
  already journaled (by any run, any worker) are replayed, not sent. `budget:` caps are
  checked against the journal as it stands plus this shard's requests, and every 0.5 s
  against what the other shards have spent since (`Budget.watch_others`). Each shard that
  has a request for an embedded model starts its own llama.cpp server.
- `on_worker`: around a worker-side shard. For a URL `output_dir`, a worker on another
  machine (its mirror is not the flow's) pulls the URL's journal into its own mirror first
  and pushes its journal after, so a shard retried on another machine still replays what
  was answered; workers on the flow's machine share the flow's mirror. Whatever the shard
  raises leaves it `portable`.
- `portable`: an exception as it can cross back to the flow's process. `ShardFailed` keeps
  its message and its errors, an error that does not pickle becomes a `WorkerError` with its
  type's name and text, and `BudgetReached` stays itself.
- `process_grader`: one grader per process, kept across its shards.
- On the flow's side: `add_stats` sums a shard's request figures, `budget_stop` finds the
  `BudgetReached` among the shards' failures.

Workers never take the output folder's run lock (flows/orchestration/run_lock.py): they
write under the flow's.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from flows.grading import Grader
from flows.inputs.number_prompts import NumberPrompt
from flows.models.budget import Budget, BudgetReached
from flows.models.client import ClientStats
from flows.models.embedded import EmbeddedServer
from flows.models.journal import RequestJournal
from flows.publishing.storage import pull_state, push_state
from flows.stages.dualdistill_shard import ShardOutcome, answer_grade_stitch
from flows.stages.number_generation import GenerationFailed, complete_shard
from flows.stages.self_distillation import RoundShardOutcome, TeacherKey, sample_select_complete
from flows.stages.shards import ShardFailed
from flows.teachers.number_teachers import leakage_budget, number_teachers
from flows.teachers.runtime import Runtime, build_runtime, journal_dir
from flows.teachers.students import StudentRuntime, build_student_runtime
from schemas.recipe import Recipe, StudentSpec
from schemas.records import GradedTrajectory, Problem

T = TypeVar("T")


def mirror_id(recipe: Recipe) -> str:
    """Which local mirror of a URL output_dir this process works in: machine and folder."""
    return f"{socket.gethostname()}:{recipe.work_dir}"


async def on_worker(recipe: Recipe, flow_mirror: str | None, work: Callable[[], Awaitable[T]]) -> T:
    """`await work()`, a shard's work on a worker, with the journal pulled from and pushed to a
    URL `output_dir` when this worker's mirror is not the flow's (`flow_mirror`: the flow's
    `mirror_id`; None: the flow's process), and what it raises made `portable`."""
    own_mirror = recipe.remote_output is not None and flow_mirror not in (None, mirror_id(recipe))
    journal = journal_dir(recipe).relative_to(recipe.state_dir).as_posix()  # the rest of the state is the flow's
    try:
        if own_mirror:
            await asyncio.to_thread(pull_state, recipe, journal)
        try:
            return await work()
        finally:
            if own_mirror:
                await asyncio.to_thread(push_state, recipe, journal)
    except BaseException as error:
        travelling = portable(error)
    raise travelling  # outside the `except`: no __context__ pointing at the original (it may not pickle)


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
        _watch_other_shards(own.budget)
        try:
            return await answer_grade_stitch(recipe, index, problems, own, process_grader())
        finally:
            await own.aclose()

    return await on_worker(recipe, flow_mirror, work)


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
        _watch_other_shards(own.budget)
        try:
            return await sample_select_complete(recipe, own, process_grader(), round_number, index, problems)
        finally:
            await own.aclose()

    return await on_worker(recipe, flow_mirror, work)


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
        _watch_other_shards(budget)
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


def _watch_other_shards(budget: Budget | None) -> None:
    """The shards on other workers spend from the same caps: count their journaled answers."""
    if budget is not None:
        budget.watch_others()


_grader: Grader | None = None
_grader_lock = threading.Lock()


def process_grader() -> Grader:
    """One grader per worker process, kept across its shards (its sympy worker takes a second
    to warm up); closed when the process exits."""
    global _grader
    with _grader_lock:
        if _grader is None:
            _grader = Grader(workers=1)
        return _grader


def add_stats(total: ClientStats, shard: ClientStats) -> None:
    for name, value in vars(shard).items():
        setattr(total, name, getattr(total, name) + value)


def budget_stop(outcomes: Iterable[object]) -> BudgetReached | None:
    """The `BudgetReached` that stopped a shard, among the shards' outcomes, or None."""
    for outcome in outcomes:
        errors = outcome.exceptions if isinstance(outcome, BaseExceptionGroup) else [outcome]
        for error in errors:
            if isinstance(error, BudgetReached):
                return error
            if isinstance(error, ShardFailed):
                for _, cause in error.errors:
                    if isinstance(cause, BudgetReached):
                        return cause
    return None


class WorkerError(RuntimeError):
    """An exception raised on a worker that could not be pickled: its type's name and text."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.type_name, str(self)))


class PortableShardFailed(ShardFailed):
    """A `ShardFailed` that pickles: the same message, stage and shard; errors that pickle."""

    def __init__(self, message: str, stage: str, shard: str, errors: list[tuple[str, BaseException]]) -> None:
        RuntimeError.__init__(self, message)
        self.stage, self.shard, self.errors = stage, shard, errors

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (str(self), self.stage, self.shard, self.errors))


def portable(error: BaseException) -> BaseException:
    """`error` as it can cross to the flow's process (see the module's docstring), without
    its cause, context and traceback (Dask's tblib would ship those too, pickled or not)."""
    if isinstance(error, ShardFailed):
        return PortableShardFailed(str(error), error.stage, error.shard,
                                   [(problem_id, portable(e)) for problem_id, e in error.errors])
    if isinstance(error, BaseExceptionGroup):
        return BaseExceptionGroup(error.message, [portable(e) for e in error.exceptions])
    try:
        pickle.loads(_plain_pickle(error))
    except Exception:  # noqa: BLE001 - whatever stops it pickling, its text survives
        return WorkerError(type(error).__name__, str(error))
    error.__cause__ = error.__context__ = error.__traceback__ = None
    return error


def _plain_pickle(value: object) -> bytes:
    """Pickled without copyreg's table, where Dask installs tblib's reducers for every
    exception class: the flow's process may not have them (Ray's does not)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = {}
    pickler.dump(value)
    return buffer.getvalue()
