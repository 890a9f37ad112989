"""The runs' model requests on an event loop of their own, in a thread of their own.

A flow's event loop also runs Prefect's engine for every stage task (state changes, events,
pickling and writing results), hands shards to grading and stitching, and updates the
progress artifacts: callbacks that each hold the loop for milliseconds, some for tens. Every
answer that arrives meanwhile waits behind them before it frees its slot and the next
request goes out. So a run's answering (DualDistill's teachers and self-distillation's
student and teachers through `answer_shard`, with the sandbox runs of their code; the
leakage teachers' completions) is run here instead, and the flow's loop awaits its outcome. The two threads share only the interpreter lock, which a busy thread hands
over every switch interval (1 ms in a `distillery` command, flows/orchestration/interpreter.py).

    answers = await request_loop.run(answer_shard(teacher, problems, shard, slots))

What a coroutine run here opens (an aiohttp session, a semaphore, a subprocess) belongs to
this loop: a runtime whose clients answered here is closed here too
(`run(runtime.aclose())`). The loop is started on first use and serves the process until
it exits; its thread is a daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The request loop, started in its thread on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="distillery-requests", daemon=True).start()
        return _loop


def call_soon(callback: Any, *args: Any) -> None:
    """`callback(*args)` on the request loop, from any thread."""
    loop().call_soon_threadsafe(callback, *args)


async def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`coroutine` run to its end on the request loop, awaited from another loop (or this one).

    Cancelling the caller cancels the coroutine there, and returns once it has ended (its
    cleanup, such as journaling an answer already received, is done by then)."""
    ended: concurrent.futures.Future[T] = concurrent.futures.Future()
    task: list[asyncio.Task[T]] = []

    def start() -> None:
        task.append(asyncio.ensure_future(coroutine))
        task[0].add_done_callback(lambda done: _copy_outcome(done, ended))

    call_soon(start)
    waiting = asyncio.wrap_future(ended)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        if not waiting.done():
            call_soon(lambda: task[0].cancel())  # `start` was queued first: the task exists by then
            await asyncio.wait([waiting])
        raise


def _copy_outcome(task: asyncio.Task[T], ended: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        ended.cancel()
    elif (error := task.exception()) is not None:
        ended.set_exception(error)
    else:
        ended.set_result(task.result())
