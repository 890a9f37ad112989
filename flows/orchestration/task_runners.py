"""Where a flow's shards run (`execution:` in the recipe): threads in the flow's process, or
a Dask or Ray cluster through Prefect's own task runners (prefect-dask, prefect-ray).

    execution: {task_runner: dask, workers: 4}                        # a local cluster of 4 processes
    execution: {task_runner: dask, address: tcp://scheduler:8786}     # a running Dask scheduler
    execution: {task_runner: ray}                                     # a local Ray runtime
    execution: {task_runner: ray, address: ray://head:10001}          # a running Ray cluster

Either way a flow runs the same task per shard: `map_here` on the flow's own event loop
(`threads`, the default), where the shards share the flow's clients, or `map_on_workers` on
a Dask or Ray cluster, where each shard builds its own clients from the recipe
(flows/orchestration/on_worker.py), so each shard in flight has the recipe's
`max_concurrency` per teacher. A local cluster runs one shard per worker at a time
(Dask: one thread per worker process; Ray: `num_cpus` = workers, a task takes one CPU), so
there the limit is per worker. On a cluster of your own, a Dask worker runs as many shards at
once as it has threads (`dask worker ADDRESS --nthreads 1` for one) and a Ray node as many as
it has CPUs. Shards are submitted as the cluster takes them, twice as many at once as it has
worker threads (Dask) or CPUs (Ray), counted again as each shard ends (a cluster that
scales up gets more).

Workers need the flow's Prefect API: without PREFECT_API_URL a flow runs on a temporary
server, and each worker would start one of its own; `workers_reach_the_api` hands them the
flow's instead (a local cluster reaches it on loopback; a remote one needs a real server).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from prefect.tasks import Task
from prefect.utilities.annotations import quote

from schemas.recipe import ExecutionSpec, Recipe

INSTALL_HINTS = {"dask": "pip install 'distillery[dask]' (prefect-dask)",
                 "ray": "pip install 'distillery[ray]' (prefect-ray)"}


class TaskRunnerUnavailable(RuntimeError):
    """The recipe asks for a task runner whose package is not installed."""


def is_distributed(spec: ExecutionSpec) -> bool:
    return spec.task_runner != "threads"


def build_task_runner(spec: ExecutionSpec) -> TaskRunner:
    """The Prefect task runner for a distributed `execution:` (not started)."""
    try:
        if spec.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            if spec.address:
                return DaskTaskRunner(address=spec.address)
            return DaskTaskRunner(cluster_kwargs={
                "n_workers": spec.workers, "threads_per_worker": 1, "processes": True,
                "dashboard_address": ":0",  # any free port: two runs on one machine do not collide
            })
        if spec.task_runner == "ray":
            from prefect_ray import RayTaskRunner

            if spec.address:
                return RayTaskRunner(address=spec.address)
            return RayTaskRunner(init_kwargs={"num_cpus": spec.workers, "include_dashboard": False})
    except ImportError as exc:
        raise TaskRunnerUnavailable(f"execution.task_runner: {spec.task_runner} needs "
                                    f"{INSTALL_HINTS[spec.task_runner]}: {exc}") from None
    raise ValueError(f"execution.task_runner: {spec.task_runner!r} is not a distributed task runner")


@contextlib.asynccontextmanager
async def started(spec: ExecutionSpec) -> AsyncIterator[TaskRunner]:
    """The recipe's task runner, started (a local cluster is created here, and shut down on
    exit) off the event loop, with the flow's Prefect API handed to its workers."""
    runner = build_task_runner(spec)
    with workers_reach_the_api(spec):
        if spec.task_runner == "dask":
            runner.__enter__()  # cheap: the cluster comes with the client, in a thread
            await asyncio.to_thread(lambda: runner.client)
        else:
            runner.__enter__()  # ray.init in the main thread, where it sets its signal handlers
        try:
            yield runner
        finally:
            await asyncio.to_thread(runner.__exit__, None, None, None)


@contextlib.asynccontextmanager
async def workers(spec: ExecutionSpec) -> AsyncIterator[TaskRunner | None]:
    """The started runner of a distributed `execution:`, or None for `threads` (the flow's
    own event loop runs the shards); one cluster serves every stage and round of a run."""
    if not is_distributed(spec):
        yield None
        return
    async with started(spec) as runner:
        yield runner


def for_workers(recipe: Recipe) -> Recipe:
    """The recipe as workers get it: a local `output_dir` made absolute (a worker's working
    directory may not be the flow's)."""
    if recipe.remote_output is not None:
        return recipe
    return recipe.model_copy(update={"output_dir": str(Path(recipe.output_dir).resolve())})


async def map_on_workers(
    runner: TaskRunner, task: Task, calls: Iterable[dict[str, Any]],
    on_finished: Callable[[Finished], Awaitable[None]],
) -> list[Any]:
    """`task(**call)` for each call on the cluster; `on_finished` sees each as it ends (in the
    order they end). Returns each call's value, or the exception it failed with, in call order.

    Calls are taken from `calls` as they are submitted, at most twice as many at once as the
    cluster runs (`shards_at_once_on`, asked again as each ends): each worker has one waiting
    for it, and the flow does not hold every shard's problems (nor the cluster every task)
    up front."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Queue[tuple[int, PrefectFuture]] = asyncio.Queue()
    waiting = iter(calls)
    outcomes: list[Any] = []

    def submit_next() -> bool:
        call = next(waiting, None)
        if call is None:
            return False
        index = len(outcomes)
        outcomes.append(None)
        future = submit(runner, task, **call)
        # called in a Dask or Ray thread
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(ended.put_nowait, (index, f)))
        return True

    in_flight = 0

    async def fill() -> None:  # the cluster counted again each time: one that grows gets more
        nonlocal in_flight
        at_once = 2 * await asyncio.to_thread(shards_at_once_on, runner)
        while in_flight < at_once and submit_next():
            in_flight += 1

    try:
        await fill()
        while in_flight:
            index, future = await ended.get()
            done = await asyncio.to_thread(_outcome, index, future)  # reads the result from the worker
            outcomes[index] = done.value
            in_flight -= 1
            await on_finished(done)  # first: what ended reaches the spool even if submitting the next fails
            await fill()
    except Exception:
        # reading the next call's problems, submitting it or `on_finished` failed: nothing more
        # goes out, and the shards under way are waited for (their results are kept for a rerun)
        # rather than killed with the cluster
        while in_flight:
            await ended.get()
            in_flight -= 1
        raise
    return outcomes


async def map_here(
    task: Task, calls: Iterable[dict[str, Any]], at_once: int, on_finished: Callable[[Finished], Awaitable[None]],
) -> list[Any]:
    """What `map_on_workers` does, on this event loop (`execution: threads`): `task(**call)`
    for each call, at most `at_once` + 1 at a time (one more than keeps the teachers busy, so
    a shard answers while another grades), each call taken from `calls` as it starts.
    Every argument is passed `quote(...)`d: Prefect otherwise walks every record of every
    list looking for futures (17 s of CPU for 2,000 problems)."""
    window = asyncio.Semaphore(at_once + 1)
    outcomes: list[Any] = []

    async def one(index: int, call: dict[str, Any]) -> None:
        try:
            state = await task(**{name: quote(value) for name, value in call.items()}, return_state=True)
            value = await state.aresult(raise_on_failure=False)
            outcomes[index] = value
            await on_finished(Finished(index, value, failed=isinstance(value, BaseException),
                                       cached=state.name == "Cached"))
        finally:
            window.release()

    running, waiting = [], iter(calls)
    while True:
        await window.acquire()  # before the next call is taken: its shard is read only when it can start
        call = next(waiting, None)
        if call is None:
            break
        outcomes.append(None)
        running.append(asyncio.create_task(one(len(outcomes) - 1, call)))
    await asyncio.gather(*running)
    return outcomes


def shards_at_once_on(runner: TaskRunner) -> int:
    """How many tasks the runner's cluster runs at once: its Dask workers' threads, its Ray CPUs."""
    if hasattr(runner, "client"):  # Dask
        return max(1, sum(runner.client.nthreads().values()))
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def workers_reach_the_api(spec: ExecutionSpec) -> Iterator[None]:
    """Without PREFECT_API_URL the flow's client talks to a temporary server; put its URL in
    the settings that travel with each submitted task, so workers use it too."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = FlowRunContext.get()
    if PREFECT_API_URL.value() or context is None or context.client is None:
        yield
        return
    url = str(context.client.api_url).rstrip("/")
    if spec.address:
        get_run_logger().warning(
            "execution.address %s: this run's Prefect server is a temporary one on %s, which workers on other "
            "machines cannot reach; start a server they can reach and set PREFECT_API_URL", spec.address, url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def submit(runner: TaskRunner, task: Task, **parameters: Any) -> PrefectFuture:
    """`task.submit(**parameters)` through `runner` (what Task.submit does with the flow's own)."""
    return runner.submit(task, parameters)


@dataclass
class Finished:
    """A submitted task that ended: its position in the submitted list, its return value or
    the exception it failed with, and whether it was a cache hit (nothing ran)."""

    index: int
    value: Any
    failed: bool
    cached: bool


def _outcome(index: int, future: PrefectFuture) -> Finished:
    try:
        value = future.result(raise_on_failure=False)  # a failed task's exception is returned
    except Exception as exc:  # noqa: BLE001 - the worker was lost (Dask's KilledWorker…)
        return Finished(index, exc, failed=True, cached=False)
    state = future.state
    if isinstance(value, BaseException):
        return Finished(index, value, failed=True, cached=False)
    if not state.is_completed():
        return Finished(index, RuntimeError(f"task run {future.task_run_id} ended {state.name}: {state.message}"),
                        failed=True, cached=False)
    return Finished(index, value, failed=False, cached=state.name == "Cached")
