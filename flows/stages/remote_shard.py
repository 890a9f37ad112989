"""A whole DualDistill shard, self-contained: what a Dask or Ray worker runs.

Nothing of the flow's process reaches a worker (live clients, the sandbox, embedded
servers, the progress file), so `run_shard` builds its own runtime from the recipe where
it runs — clients, sandbox and journal on the shared journal folder — answers the shard with
both teachers, grades, stitches, closes everything, and returns picklable records.

- Requests: each call has its own clients, so the recipe's `max_concurrency` holds per
  shard in flight (per worker on a local cluster, which runs one shard per worker).
- Journal: the same folder as the flow's (`output_dir/.distillery/journal/`), one file per
  role and shard, so workers on several processes or machines never write the same file.
  Answers already journaled (by any run, any worker) are replayed, not sent.
- Budget: `budget:` caps are checked against the journal as it stands when the shard starts
  plus this shard's own requests; shards running at once do not see each other's requests,
  so a cap can be passed by what the other shards in flight send.
- Embedded teachers: each shard that has a request to send starts its own llama.cpp server.
- `output_dir` as a URL: workers on the flow's machine share its local mirror (the flow
  pulls and pushes it); elsewhere the shard pulls the URL's state (journal) into that
  machine's mirror first and pushes its journal after, so a shard retried on another
  machine still replays what was answered.
- Failures: what it raises pickles (it crosses back to the flow's process): `ShardFailed`
  keeps its message and its errors, an error that does not pickle becomes a `WorkerError`
  with its type's name and text, and `BudgetReached` stays itself.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import socket
import threading
from dataclasses import dataclass

from flows.grading import Grader
from flows.inputs.prompts import load_prompt
from flows.models.client import ClientStats
from flows.publishing.storage import pull_state, push_state
from flows.stages.shards import ShardFailed, answer_shard, grade_shard, shard_name
from flows.stages.stitching import stitch_shard
from flows.teachers.runtime import Runtime, build_runtime, journal_dir
from schemas.recipe import Recipe
from schemas.records import Composite, GradedTrajectory, Problem, Rejected

ROLES = ("tool", "reasoning")


@dataclass
class ShardOutcome:
    graded: list[GradedTrajectory]
    composites: list[Composite]
    rejected: list[Rejected]
    stats: dict[str, ClientStats]  # per role: this shard's requests (sent, replayed, tokens)
    sandbox: str  # the sandbox the tool teacher's code ran in, on the worker


def mirror_id(recipe: Recipe) -> str:
    """Which local mirror of a URL output_dir this process works in: machine and folder."""
    return f"{socket.gethostname()}:{recipe.work_dir}"


async def run_shard(
    recipe: Recipe, index: int, problems: list[Problem], flow_mirror: str | None = None, grader: Grader | None = None,
) -> ShardOutcome:
    """Answer, grade and stitch shard `index` with a runtime of its own. `flow_mirror`: the
    flow's `mirror_id`; for a URL output_dir, a worker working in another mirror (another
    machine) pulls the URL's state first and pushes its journal after. `grader`: default,
    one per process (`process_grader`)."""
    own_mirror = recipe.remote_output is not None and flow_mirror not in (None, mirror_id(recipe))
    journal = journal_dir(recipe).relative_to(recipe.state_dir).as_posix()  # the rest of the state is the flow's
    try:
        if own_mirror:
            await asyncio.to_thread(pull_state, recipe, journal)
        runtime = build_runtime(recipe)
        try:
            return await _answer_grade_stitch(recipe, index, problems, runtime, grader or process_grader())
        finally:
            await runtime.aclose()
            if own_mirror:
                await asyncio.to_thread(push_state, recipe, journal)
    except BaseException as error:
        travelling = portable(error)
    raise travelling  # outside the `except`: no __context__ pointing at the original


async def _answer_grade_stitch(
    recipe: Recipe, index: int, problems: list[Problem], runtime: Runtime, grader: Grader
) -> ShardOutcome:
    shard = shard_name(index)
    answers = await asyncio.gather(
        *(answer_shard(runtime.teacher(role), problems, shard, runtime.problem_slots(role)) for role in ROLES),
        return_exceptions=True,
    )
    errors = [outcome for outcome in answers if isinstance(outcome, BaseException)]
    if errors:
        raise errors[0] if len(errors) == 1 else BaseExceptionGroup(f"{shard}: both teachers failed", errors)
    trajectories = [t for outcome in answers for t in outcome]
    graded = await asyncio.to_thread(grade_shard, trajectories, problems, grader, recipe.system_prompt)
    spec = recipe.stitching
    composites, rejected = stitch_shard(problems, graded, load_prompt(spec.transitions), spec.order, spec.seed,
                                        recipe.system_prompt)
    return ShardOutcome(graded, composites, rejected, {role: runtime.teacher(role).client.stats for role in ROLES},
                        runtime.sandbox.name)


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
