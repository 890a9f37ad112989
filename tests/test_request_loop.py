"""The request loop: coroutines run to their end on its thread, awaited from the flow's loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flows.orchestration import request_loop


async def _where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_a_coroutine_runs_on_the_request_loops_thread_and_its_value_comes_back():
    async def flow() -> tuple[str, str]:
        return threading.current_thread().name, await request_loop.run(_where())

    caller, there = asyncio.run(flow())
    assert there == "distillery-requests" != caller


def test_an_error_there_is_raised_here_as_itself():
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("problem b7")

    with pytest.raises(KeyError, match="b7"):
        asyncio.run(request_loop.run(fails()))


def test_cancelling_the_caller_cancels_the_coroutine_there_and_waits_for_its_cleanup():
    started, cleaned_up = threading.Event(), threading.Event()

    async def answering() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # e.g. journaling an answer already received
            cleaned_up.set()

    async def flow() -> None:
        call = asyncio.create_task(request_loop.run(answering()))
        while not started.is_set():
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert cleaned_up.is_set()  # not left running behind the caller's back

    asyncio.run(flow())


def test_a_coroutine_cancelled_there_reads_as_cancelled_here():
    async def flow() -> None:
        tasks: list[asyncio.Task] = []

        async def cancelled_from_its_own_loop() -> None:
            tasks.append(asyncio.current_task())
            await asyncio.sleep(60)

        call = asyncio.create_task(request_loop.run(cancelled_from_its_own_loop()))
        while not tasks:
            await asyncio.sleep(0.01)
        request_loop.call_soon(tasks[0].cancel)
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(flow())
