"""A head start for `distillery run`: the first shards' requests go out while Prefect loads.

Importing Prefect and starting a flow run take ~2 s on these machines before the flow's
first task runs. So `distillery run` (with `execution.task_runner: threads` and a local
`output_dir`) first builds the run's runtime (clients, journal, sandbox, budget) and
starts each teacher's first window of shards with the very `answer_shard` the flow's
answer task calls, on the request loop where the flow answers too
(flows/orchestration/request_loop.py); then it imports the flow (and `datasets`, which the
flow's publishing needs) in a thread, while those requests are out, and calls it.

Until the flow takes the runtime over (`claim`), each teacher keeps as many shards under
way as the flow would, starting the next as one finishes. The answer task of each of
those shards then awaits the answers already under way (`HeadStart.take`) instead of
asking for them again. What the flow does not take (a shard whose answers Prefect had
cached) is cancelled when it finishes; every answer received is journaled either way. A
head start that cannot be set up (a bad problem file, no sandbox) is dropped without a
word: the flow meets the same error and reports it as usual. Nothing here imports Prefect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from flows.inputs.problem_shards import ProblemShards, run_problems
from flows.orchestration import request_loop
from flows.stages.shards import answer_shard, shard_name, shards_at_once
from flows.teachers.runtime import Runtime, build_runtime
from schemas.recipe import Recipe
from schemas.records import Problem, Trajectory

log = logging.getLogger(__name__)

ROLES = ("tool", "reasoning")
# how long the first requests' set-up (journal lookups, connections) has the interpreter to
# itself before Prefect's import in a thread competes with it for the GIL
ALONE_S = 0.05


@dataclass
class StartedShard:
    """One shard's answers under way on the request loop, counting what finished before anyone
    watched."""

    problems: list[Problem]
    task: asyncio.Task[list[Trajectory]] | None = None
    finished: int = 0
    _on_done: Callable[[], None] | None = None

    def tick(self) -> None:
        self.finished += 1
        if self._on_done is not None:
            self._on_done()

    async def answers(self, on_done: Callable[[], None]) -> list[Trajectory]:
        """The shard's trajectories; `on_done` hears of every sample (on the request loop's
        thread), those already finished at once."""
        return await request_loop.run(self._answers(on_done))

    async def _answers(self, on_done: Callable[[], None]) -> list[Trajectory]:
        for _ in range(self.finished):
            on_done()
        self._on_done = on_done
        assert self.task is not None
        return await self.task


@dataclass
class HeadStart:
    recipe: Recipe
    runtime: Runtime
    problems: ProblemShards  # the run's, read from its source once: the flow takes them too (`problems_of`)
    shards: dict[tuple[str, str], StartedShard] = field(default_factory=dict)  # not taken yet
    started: list[tuple[str, str]] = field(default_factory=list)  # (role, shard), in the order they started
    feeders: list[asyncio.Task[None]] = field(default_factory=list)

    def take(self, role: str, shard: str, problems: list[Problem]) -> StartedShard | None:
        """The answers already under way for this role's shard, once (a retry starts afresh)."""
        started = self.shards.pop((role, shard), None)
        if started is not None and started.problems != problems:
            _cancel(started)
            return None
        return started

    async def stop_starting(self) -> None:
        """Start no more shards (those under way go on)."""
        await request_loop.run(self._stop_feeding())

    async def close(self) -> None:
        """Start no more shards; cancel those nobody took (their received answers stay journaled)."""
        await request_loop.run(self._close())

    def _start_feeding(self) -> None:
        self.feeders = [asyncio.ensure_future(self._feed(role)) for role in ROLES]

    async def _stop_feeding(self) -> None:
        for feeder in self.feeders:
            feeder.cancel()
        await asyncio.gather(*self.feeders, return_exceptions=True)
        self.feeders = []  # a finished task keeps its coroutine, and with it the shards the feeder last read

    async def _close(self) -> None:
        await self._stop_feeding()
        left, self.shards = list(self.shards.values()), {}
        for started in left:
            _cancel(started)
        await asyncio.gather(*(s.task for s in left if s.task is not None), return_exceptions=True)

    async def _feed(self, role: str) -> None:
        """Keep the role's first shards under way, as many at once as the flow would have, starting
        the next as one finishes, until the flow claims the head start."""
        teacher, slots = self.runtime.teacher(role), self.runtime.problem_slots(role)
        window = asyncio.Semaphore(shards_at_once(self.runtime.problems_in_flight(role), self.recipe.shard_size))
        for index in range(len(self.problems)):
            await window.acquire()
            problems = self.problems.read(index)
            started = StartedShard(problems)
            started.task = asyncio.create_task(
                answer_shard(teacher, problems, shard_name(index), slots, on_done=started.tick))
            started.task.add_done_callback(lambda _: window.release())
            self.shards[(role, shard_name(index))] = started
            self.started.append((role, shard_name(index)))


_pending: HeadStart | None = None


def begin(recipe: Recipe) -> HeadStart | None:
    """Start the first shards of a DualDistill run now (on the request loop), for the flow to
    claim. None where the run does not answer in this process or cannot be set up."""
    global _pending
    if recipe.execution.task_runner != "threads" or recipe.remote_output is not None or recipe.teachers is None:
        return None
    try:
        problems = run_problems(recipe)
        runtime = build_runtime(recipe)
    except Exception:  # noqa: BLE001 - the flow meets the same error and reports it
        log.debug("no head start", exc_info=True)
        return None
    head = HeadStart(recipe, runtime, problems)
    request_loop.call_soon(head._start_feeding)
    _pending = head
    return head


def problems_of(recipe: Recipe) -> ProblemShards | None:
    """The problems the head start begun for this very recipe read, if any (not read twice)."""
    return _pending.problems if _pending is not None and _pending.recipe == recipe else None


async def claim(recipe: Recipe) -> HeadStart | None:
    """The head start begun for this very recipe in this process, handed over once; any other
    is closed (its runtime too)."""
    global _pending
    head, _pending = _pending, None
    if head is not None and head.recipe == recipe:
        await head.stop_starting()  # from here the flow starts shards
        return head
    if head is not None:
        await _close(head)
    return None


async def drop() -> None:
    """Close a head start the flow never claimed (it failed before answering)."""
    global _pending
    head, _pending = _pending, None
    if head is not None:
        await _close(head)


async def _close(head: HeadStart) -> None:
    await head.close()
    await request_loop.run(head.runtime.aclose())


def _cancel(started: StartedShard) -> None:
    if started.task is not None:
        request_loop.call_soon(started.task.cancel)
