"""Endpoint pools and adaptive concurrency (flows/models/endpoints.py), against loopback fakes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time

import pytest
from fake_openai import FakeOpenAIServer, Reply

from flows.models.client import ModelClient, ModelRequestError
from flows.models.endpoints import AdaptiveLimit, Endpoint, EndpointPool
from flows.models.journal import RequestJournal
from flows.teachers.runtime import model_client
from schemas.recipe import AutoConcurrency, TeacherSpec

PARAMS = {"temperature": 0.6, "max_tokens": 50, "seed": 7}


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}]


def echo(body: dict) -> str:
    return body["messages"][-1]["content"]


def refused_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def limit_changes(caplog) -> list[tuple[int, int, str]]:
    found = (re.search(r"in-flight limit (\d+) -> (\d+) \((.*)\)", r.getMessage()) for r in caplog.records)
    return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


class Recovering:
    """HTTP 500 until `healthy` is set, then quick answers."""

    def __init__(self) -> None:
        self.healthy = False

    def __call__(self, body: dict) -> Reply:
        return Reply(content=f"a:{echo(body)}", delay_s=0.005) if self.healthy else Reply(status=500, delay_s=0)


def test_pool_routes_around_a_failing_endpoint_probes_it_and_prefers_the_fast_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distillery.client")
    bad = Recovering()
    with (FakeOpenAIServer(bad) as failing,
          FakeOpenAIServer(lambda b: Reply(content=f"a:{echo(b)}"), latency_s=0.15) as slow,
          FakeOpenAIServer(lambda b: Reply(content=f"a:{echo(b)}"), latency_s=0.005) as fast):
        client = ModelClient(model="m", base_url=[failing.base_url, slow.base_url, fast.base_url],
                             journal=RequestJournal(tmp_path / "j"), max_concurrency=4, backoff_base_s=0.02)

        async def ask(i: int, after: float):
            await asyncio.sleep(after)
            return await client.chat(question(i), PARAMS)

        async def go():
            first = await asyncio.gather(*(ask(i, 0.01 * i) for i in range(40)))
            while_failing = len(failing.requests)
            bad.healthy = True
            out = client._pool.endpoints[0]
            await asyncio.sleep(max(0.0, out.down_until - time.monotonic()))  # its cool-down ends
            second = await asyncio.gather(*(ask(i, 0.01 * (i - 40)) for i in range(40, 80)))
            await client.aclose()
            return first + second, while_failing

        answers, while_failing = asyncio.run(go())

    assert [a.content for a in answers] == [f"a:q{i}" for i in range(80)]  # every request answered
    assert 3 <= while_failing <= 12  # two failures took it out, then only probes (cool-down doubling)
    log = [r.getMessage() for r in caplog.records]
    assert any(failing.base_url in m and "taken out" in m for m in log)
    assert any(failing.base_url in m and "back in service" in m for m in log)
    after = failing.requests[while_failing:]
    assert len(after) >= 5  # the probe, then traffic again
    first_half = [echo(b) for b in fast.requests if int(echo(b)[1:]) < 40]
    slow_half = [echo(b) for b in slow.requests if int(echo(b)[1:]) < 40]
    assert len(first_half) > 2 * len(slow_half)  # fewer in flight on the fast one: it gets more

    client.journal.close()
    lines = [json.loads(line) for f in sorted((tmp_path / "j").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(lines) == 80 and len({line["key"] for line in lines}) == 80
    assert "127.0.0.1" not in (tmp_path / "j").joinpath("shard.jsonl").read_text()

    # another pool, nobody listening: everything is answered from the journal
    again = ModelClient(model="m", base_url=[refused_url(), refused_url()], journal=RequestJournal(tmp_path / "j"))

    async def rerun():
        return await asyncio.gather(*(again.chat(question(i), PARAMS) for i in range(80)))

    replayed = asyncio.run(rerun())
    assert [a.content for a in replayed] == [f"a:q{i}" for i in range(80)] and all(a.replayed for a in replayed)
    assert again.stats.sent == 0 and again.stats.replayed == 80


def test_refused_endpoint_is_taken_out_and_the_pool_answers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distillery.client")
    dead = refused_url()
    with FakeOpenAIServer(lambda b: Reply(content="ok"), latency_s=0.005) as server:
        client = ModelClient(model="m", base_url=[dead, server.base_url], journal=RequestJournal(tmp_path / "j"),
                             max_concurrency=2, backoff_base_s=0.02)

        async def go():
            answers = await asyncio.gather(*(client.chat(question(i), PARAMS) for i in range(30)))
            await client.aclose()
            return answers

        assert all(a.content == "ok" for a in asyncio.run(go()))
    assert len(server.requests) == 30
    assert any(dead in r.getMessage() and "taken out" in r.getMessage() for r in caplog.records)


def test_every_endpoint_out_fails_naming_them_all(tmp_path):
    urls = [refused_url(), refused_url()]
    client = ModelClient(model="m", base_url=urls, journal=RequestJournal(tmp_path / "j"),
                         max_retries=3, backoff_base_s=0.01)

    async def go():
        try:
            return await client.chat(question(0), PARAMS)
        finally:
            await client.aclose()

    with pytest.raises(ModelRequestError) as err:
        asyncio.run(go())
    assert all(url in str(err.value) for url in urls) and "gave up after 4 attempts" in str(err.value)


class LoadedServer:
    """Latency 100 ms, plus 50 ms per request in flight beyond `knee`, until `recovered`
    (large enough that the fake server sharing this process's GIL does not blur it)."""

    def __init__(self, knee: int) -> None:
        self.knee = knee
        self.recovered = False
        self.in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        with self._lock:
            self.in_flight += 1
            load = self.in_flight
        extra = 0 if self.recovered else 0.05 * max(0, load - self.knee)
        time.sleep(0.1 + extra)
        with self._lock:
            self.in_flight -= 1
        return Reply(content="ok", delay_s=0)


def test_adaptive_limit_shrinks_under_load_and_grows_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distillery.client")
    loaded = LoadedServer(knee=6)
    with FakeOpenAIServer(loaded) as server:
        client = ModelClient(model="m", base_url=server.base_url, journal=RequestJournal(tmp_path / "j"),
                             max_concurrency="auto", auto_concurrency=AutoConcurrency(start=2, min=1, max=24))
        assert client.capacity == 24

        async def go():
            await asyncio.gather(*(client.chat(question(i), PARAMS) for i in range(150)))
            during_load = len(limit_changes(caplog))
            loaded.recovered = True
            await asyncio.gather(*(client.chat(question(i), PARAMS) for i in range(150, 450)))
            await client.aclose()
            return during_load

        during_load = asyncio.run(go())

    changes = limit_changes(caplog)
    loaded_phase, recovered_phase = changes[:during_load], changes[during_load:]
    shrinks = [c for c in loaded_phase if c[1] < c[0]]
    assert shrinks and all("p50 latency" in why and " > 2 x " in why for _, _, why in shrinks)
    assert all(old > 7 for old, _, _ in shrinks)  # only past the knee (+1: within 2 x latency)
    # the first window (every request starting at once) may set a high baseline; after the
    # first correction the limit stays near the knee
    after_first_shrink = loaded_phase[loaded_phase.index(shrinks[0]) + 1:]
    peak_under_load = max(new for _, new, _ in after_first_shrink)
    assert peak_under_load <= 12
    assert max(new for _, new, _ in recovered_phase) >= peak_under_load + 4  # grew back once latency held


def test_limit_halves_once_per_overload_and_shrinks_under_requests_in_flight():
    limit = AdaptiveLimit("http://x/v1", start=8, lowest=2, highest=16, latency_factor=2.0)
    endpoint = Endpoint("http://x/v1", limit=8, session=None, adaptive=limit)
    pool = EndpointPool([endpoint])

    async def go():
        leases = [await pool.acquire() for _ in range(8)]
        pool.failed(leases[0], "HTTP 429")
        pool.failed(leases[1], "HTTP 429")  # sent before the first decrease: no second halving
        assert endpoint.limit == 4 and endpoint.in_flight == 6
        waiting = asyncio.ensure_future(pool.acquire())
        for lease in leases[2:4]:
            pool.succeeded(lease, 0.1)  # answers from before the decrease: not counted in a window
            await asyncio.sleep(0)
        assert not waiting.done()  # 4 still in flight, limit 4
        pool.succeeded(leases[4], 0.1)
        await asyncio.sleep(0)
        assert waiting.done()
        return limit

    assert asyncio.run(go()).value == 4


def test_baseline_tracks_best_window_and_growth_is_one_per_window():
    limit = AdaptiveLimit("e", start=5, lowest=1, highest=8, latency_factor=2.0)
    for _ in range(5):
        limit.answered(1.0, 0)
    assert (limit.value, limit.baseline) == (6, 1.0)
    for _ in range(6):
        limit.answered(2.5, 0)  # > 2 x 1.02
    assert limit.value == 3 and limit.epoch == 1
    limit.answered(0.1, 0)  # a request of the old epoch
    assert limit._window == []


def test_pool_of_one_from_a_coroutine_and_capacity(tmp_path):
    with FakeOpenAIServer(lambda b: Reply(content="ok")) as server:
        async def start() -> str:
            return server.base_url

        client = ModelClient(model="m", base_url=start, journal=RequestJournal(tmp_path / "j"), max_concurrency=3)
        assert client.endpoint == "embedded" and client.capacity == 3

        async def go():
            answer = await client.chat(question(0), PARAMS)
            await client.aclose()
            return answer

        assert asyncio.run(go()).content == "ok"
        assert client.endpoint == server.base_url


def test_model_client_passes_the_pool_and_auto_settings(tmp_path):
    spec = TeacherSpec(base_url=["http://a:1/v1", "http://b:1/v1"], model="m", max_concurrency="auto",
                       auto_concurrency=AutoConcurrency(start=4, max=32))
    client = model_client(spec, RequestJournal(tmp_path / "j"), [])
    assert client.base_url == ["http://a:1/v1", "http://b:1/v1"] and client.capacity == 64
    assert client.endpoint == "http://a:1/v1, http://b:1/v1"
    fixed = model_client(TeacherSpec(base_url="http://a:1/v1", model="m", max_concurrency=5),
                         RequestJournal(tmp_path / "k"), [])
    assert fixed.capacity == 5
