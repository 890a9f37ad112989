"""What a shard on a Dask or Ray worker needs, whichever job it belongs to.

A shard of each job runs as the job's flow file says (`dualdistill_shard` in
flows/dualdistill.py, `round_shard` in flows/self_distill.py, `numbers_shard` in
flows/leakage.py). On the flow's own event loop (`execution: threads`) it uses the flow's
runtime; on a worker, nothing of the flow's process is there (live clients, the sandbox,
embedded servers, the progress file), so it builds its own clients from the recipe on the
shared journal folder, runs the same stage function, closes everything and returns picklable
records. Each worker-side shard has its own clients, so the recipe's `max_concurrency` holds
per shard in flight (per worker on a local cluster). Answers already journaled (by any run,
any worker) are replayed, not sent. `budget:` caps are checked against the journal as it
stands plus this shard's requests, and every 0.5 s against what the other shards have spent
since (`watch_other_shards`). Each shard that has a request for an embedded model starts its
own llama.cpp server. Here:

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
from typing import TypeVar

from flows.grading import Grader
from flows.models.budget import Budget, BudgetReached
from flows.models.client import ClientStats
from flows.publishing.storage import pull_state, push_state
from flows.stages.shards import ShardFailed
from flows.teachers.runtime import journal_dir
from schemas.recipe import Recipe

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


def watch_other_shards(budget: Budget | None) -> None:
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
