"""The endpoints behind one `ModelClient`: a pool of servers serving one model, each with
an in-flight limit, fixed or adaptive.

- A request goes to the endpoint with the fewest requests in flight relative to its
  limit; when every endpoint is at its limit it waits for a slot. The limit may shrink
  while requests are in flight: no new request goes out until the count is below it.
- After `EJECT_AFTER` failures in a row (connection error, timeout, 429/5xx), or at once
  when the server sends `Retry-After`, an endpoint is taken out for a cool-down (doubling
  from `cooldown_base_s` up to `MAX_COOLDOWN_S`, at least what `Retry-After` asks). Then
  one request goes to it as a probe: an answer puts it back, a failure doubles the
  cool-down. While every endpoint is out, `acquire` raises `EndpointsOut` saying when the
  first is due, and the client counts that as a failed attempt and waits. A pool of one
  is never taken out: there is nowhere else to send, and the client's retries back off.
- `AdaptiveLimit` (`max_concurrency: auto`) is AIMD on latency: +1 after a window of
  `limit` answers whose median latency stays within `latency_factor` x a baseline (the
  best recent window's median, drifting up slowly so a lasting change is followed);
  halved on a slower window or on a 429/5xx/timeout. Latency is measured by the caller
  from the moment it holds a slot, so time spent waiting for the limit is not in it.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("distillery.client")

EJECT_AFTER = 2  # failures in a row that take an endpoint out (one timeout among answers does not)
MAX_COOLDOWN_S = 60.0
MIN_WINDOW = 5  # answers per latency window, at least
BASELINE_DRIFT = 1.02  # per window: the baseline forgets a best latency that no longer shows up


class AdaptiveLimit:
    """The AIMD in-flight limit of one endpoint, within [lowest, highest]."""

    def __init__(self, name: str, start: int, lowest: int, highest: int, latency_factor: float) -> None:
        self.name = name
        self.value = start
        self.lowest, self.highest, self.factor = lowest, highest, latency_factor
        self.baseline: float | None = None  # seconds
        self.epoch = 0  # bumped by each decrease: answers to requests sent before it do not count
        self._window: list[float] = []

    def answered(self, latency: float, epoch: int) -> int:
        """Count one answer; returns by how much the limit grew (0 or 1)."""
        if epoch != self.epoch:
            return 0
        window = self._window
        window.append(latency)
        if len(window) < max(self.value, MIN_WINDOW):
            return 0
        p50 = statistics.median(window)
        window.clear()
        ceiling = None if self.baseline is None else self.baseline * BASELINE_DRIFT
        self.baseline = p50 if ceiling is None else min(p50, ceiling)
        if ceiling is not None and p50 > self.factor * ceiling:
            self._set(max(self.lowest, self.value // 2),
                      f"p50 latency {p50:.2f} s > {self.factor:g} x {ceiling:.2f} s")
            return 0
        if self.value < self.highest:
            self._set(self.value + 1, f"p50 latency {p50:.2f} s <= {self.factor:g} x {self.baseline:.2f} s")
            return 1
        return 0

    def overloaded(self, reason: str, epoch: int) -> None:
        if epoch == self.epoch:
            self._set(max(self.lowest, self.value // 2), reason)

    def _set(self, value: int, why: str) -> None:
        if value == self.value:
            return
        if value < self.value:
            self.epoch += 1
            self._window.clear()
        log.info("endpoint %s: in-flight limit %d -> %d (%s)", self.name, self.value, value, why)
        self.value = value


@dataclass(eq=False)
class Endpoint:
    url: str
    limit: int
    session: Any  # aiohttp.ClientSession
    adaptive: AdaptiveLimit | None = None
    in_flight: int = 0
    failures: int = 0  # in a row, while in service
    down_until: float = 0.0  # time.monotonic(); 0 while in service
    cooldown: float = 0.0  # the last cool-down, doubled by each failed probe
    probing: bool = False
    last_error: str = ""

    def __post_init__(self) -> None:
        self.chat_url = f"{self.url}/chat/completions"


class Lease:
    """A slot on an endpoint, held for one request."""

    __slots__ = ("endpoint", "probe", "epoch")

    def __init__(self, endpoint: Endpoint, probe: bool) -> None:
        self.endpoint = endpoint
        self.probe = probe
        self.epoch = endpoint.adaptive.epoch if endpoint.adaptive is not None else 0


class EndpointsOut(Exception):
    """Every endpoint of the pool is out; `ready_in`: seconds until the first is due for a probe."""

    def __init__(self, endpoints: list[Endpoint], ready_in: float) -> None:
        errors = ", ".join(f"{e.url} ({e.last_error})" for e in endpoints)
        super().__init__(f"every endpoint is out: {errors}")
        self.ready_in = ready_in


@dataclass(eq=False)
class EndpointPool:
    endpoints: list[Endpoint]
    cooldown_base_s: float = 1.0
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, init=False, repr=False)

    @property
    def name(self) -> str:
        return ", ".join(e.url for e in self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)

    async def acquire(self, avoid: Endpoint | None = None) -> Lease:
        """A slot on the least loaded endpoint in service (`avoid`, where this request just
        failed, only when no other has room), or a probe of one whose cool-down is over."""
        lease = None if self._waiters else self._take(avoid)
        while lease is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(1)  # woken, then cancelled: the turn goes to the next
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            lease = self._take(avoid)
        return lease

    def _take(self, avoid: Endpoint | None) -> Lease | None:
        best, best_load, fallback, due, busy = None, 2.0, None, None, False
        for endpoint in self.endpoints:
            if endpoint.down_until:
                if endpoint.probing:
                    busy = True
                elif time.monotonic() >= endpoint.down_until:
                    if endpoint is not avoid:
                        return self._probe(endpoint)
                    due = endpoint
                continue
            if endpoint.in_flight >= endpoint.limit:
                busy = True
            elif endpoint is avoid:
                fallback = endpoint
            elif (load := endpoint.in_flight / endpoint.limit) < best_load:
                best, best_load = endpoint, load
        best = best or fallback
        if best is not None:
            best.in_flight += 1
            return Lease(best, probe=False)
        if due is not None:
            return self._probe(due)
        if busy:
            return None
        raise EndpointsOut(self.endpoints, self.ready_in())

    @staticmethod
    def _probe(endpoint: Endpoint) -> Lease:
        endpoint.probing = True
        endpoint.in_flight += 1
        return Lease(endpoint, probe=True)

    def ready_in(self) -> float:
        """Seconds until some endpoint can take a request (0: one is in service)."""
        now = time.monotonic()
        return max(0.0, min((e.down_until - now if e.down_until else 0.0) for e in self.endpoints))

    def succeeded(self, lease: Lease, latency: float) -> None:
        endpoint = lease.endpoint
        endpoint.in_flight -= 1
        grown = 0
        if endpoint.adaptive is not None:
            grown = endpoint.adaptive.answered(latency, lease.epoch)
            endpoint.limit = endpoint.adaptive.value
        if lease.probe:
            endpoint.probing = False
            endpoint.down_until = endpoint.cooldown = 0.0
            log.info("endpoint %s: answered its probe, back in service", endpoint.url)
            self._wake(len(self._waiters))
        endpoint.failures = 0
        if self._waiters:
            self._wake(1 + grown)

    def failed(self, lease: Lease, reason: str, retry_after: float | None = None) -> None:
        """The endpoint failed the request (down or overloaded)."""
        endpoint = lease.endpoint
        endpoint.in_flight -= 1
        if endpoint.adaptive is not None:
            endpoint.adaptive.overloaded(reason, lease.epoch)
            endpoint.limit = endpoint.adaptive.value
        if len(self.endpoints) > 1:
            endpoint.last_error = reason
            if lease.probe:
                endpoint.probing = False
                self._take_out(endpoint, reason, retry_after)
            elif not endpoint.down_until:
                endpoint.failures += 1
                if endpoint.failures >= EJECT_AFTER or retry_after:
                    self._take_out(endpoint, reason, retry_after)
        if self._waiters:
            self._wake(1)

    def release(self, lease: Lease) -> None:
        """The request ended without telling anything about the endpoint (cancelled, a bad answer)."""
        endpoint = lease.endpoint
        endpoint.in_flight -= 1
        if lease.probe:
            endpoint.probing = False  # the next request probes
            self._wake(len(self._waiters))
        elif self._waiters:
            self._wake(1)

    def _take_out(self, endpoint: Endpoint, reason: str, retry_after: float | None) -> None:
        endpoint.cooldown = min(MAX_COOLDOWN_S, endpoint.cooldown * 2 or self.cooldown_base_s)
        pause = max(endpoint.cooldown, retry_after or 0.0)
        endpoint.down_until = time.monotonic() + pause
        endpoint.failures = 0
        log.warning("endpoint %s: taken out for %.1f s (%s)", endpoint.url, pause, reason)
        self._wake(len(self._waiters))  # waiting requests may now find every endpoint out

    def _wake(self, count: int) -> None:
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.session.close()
