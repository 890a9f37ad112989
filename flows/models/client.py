"""Async client for any OpenAI-compatible chat endpoint, with the request journal.

- `base_url` may list several endpoints serving the model: each request goes to the
  least loaded one, and one that keeps failing is taken out for a while
  (flows/models/endpoints.py). At most `max_concurrency` requests in flight per
  endpoint, or `auto`: a limit that adapts to the endpoint's latency and errors.
- 429, 5xx, timeouts, dropped connections and answers that break the protocol (not
  JSON, no choices, no message) are retried with exponential backoff and full jitter,
  waiting at least what `Retry-After` asks. Other 4xx (bad key, unknown model, bad
  request) fail at once.
- A well-formed completion with nothing usable in it (empty or blank content) is an
  answer, journaled like any other: the grader marks it `empty_answer`. Resending it would
  get the same answer under the same seed.
- `finish_reason == "length"` is an answer, not an error: it is returned (and
  journaled) as is, never blindly re-sent.
- One sample per request: sample i is sent with `seed + i`, which emulates `n`
  on servers that ignore it (llama.cpp) and makes every sample replayable.
- Every answer is journaled before it is returned; a request whose key is in the
  journal is answered from it without touching the network.
- `max_tokens` is not part of the journal key but stored with the answer: an answer
  that finished (`finish_reason != "length"`) within the new budget is what the same
  seed would produce again, so raising `max_tokens` resends only the answers the old
  budget cut (`ClientStats.reused_across_budget` counts the others).

HTTP goes through one aiohttp session per endpoint, posting to `{base_url}/chat/completions`
with the OpenAI JSON body. The openai SDK (with either of its transports) spent 2.5-10 ms
of CPU per request in its request/response layers; this path spends ~1 ms, which is what
lets one process keep a few hundred requests per second in flight (bench/bench_dualdistill.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flows.models.budget import Budget
from flows.models.confidence import Confidence, confidence_of
from flows.models.endpoints import AdaptiveLimit, Endpoint, EndpointPool, EndpointsOut, Lease
from flows.models.journal import RequestJournal, request_key
from schemas.recipe import AutoConcurrency, Price

log = logging.getLogger("distillery.client")

JSON_BODY = {"Content-Type": "application/json"}
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class ModelRequestError(RuntimeError):
    """A request that could not be answered; names the endpoint and the cause."""

    def __init__(self, endpoint: str, model: str, message: str) -> None:
        super().__init__(f"{endpoint} (model {model}): {message}")
        self.endpoint = endpoint
        self.model = model


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, as the model wrote it


@dataclass(frozen=True)
class ChatResponse:
    content: str
    finish_reason: str
    reasoning_content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    replayed: bool = False
    confidence: Confidence | None = None  # from token logprobs, when the request asked for them

    def to_journal(self) -> dict[str, Any]:
        value = {
            "content": self.content,
            "finish_reason": self.finish_reason,
            "reasoning_content": self.reasoning_content,
            "tool_calls": [vars(call) for call in self.tool_calls],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": self.latency_s,
        }
        if self.confidence is not None:
            value["confidence"] = self.confidence.to_json()
        return value

    @classmethod
    def from_journal(cls, value: dict[str, Any]) -> ChatResponse:
        calls = tuple(ToolCall(**call) for call in value.get("tool_calls") or ())
        fields = {k: v for k, v in value.items() if k != "max_tokens"}
        confidence = Confidence(**value["confidence"]) if value.get("confidence") else None
        return cls(**{**fields, "tool_calls": calls, "confidence": confidence, "replayed": True})


def chat_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any], *, extra: dict[str, Any],
             tools: list[dict[str, Any]] | None, sample: int) -> str:
    """The journal key of a chat request: what decides its answer, never the endpoint or
    `max_tokens` (see `fits_budget`). `params` as sent (the seed already shifted by `sample`)."""
    keyed = {"model": model, "messages": messages, "extra": extra, "tools": tools, "sample": sample}
    return request_key("chat", {**keyed, "params": {k: v for k, v in params.items() if k != "max_tokens"}})


def fits_budget(journaled: dict[str, Any], max_tokens: int | None) -> bool:
    """Whether a journaled answer is what a request with this `max_tokens` would get."""
    if journaled.get("max_tokens") == max_tokens:
        return True
    if journaled.get("finish_reason") == "length":
        return False  # cut by another budget: a larger one would go further
    if max_tokens is None:
        return True
    used = journaled.get("completion_tokens") or 0
    recorded = journaled.get("max_tokens")
    return 0 < used <= max_tokens or (recorded is not None and recorded <= max_tokens)


@dataclass
class ClientStats:
    sent: int = 0  # requests that got an answer from the endpoint
    replayed: int = 0  # requests answered from the journal
    retries: int = 0
    reused_across_budget: int = 0  # replayed although the journaled answer had another max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # every answer, sent or replayed (a replay carries its original latency): what `plan` measures
    answers_latency_s: float = 0.0


class BadResponse(Exception):
    """The endpoint answered 200 with something that is not a usable completion."""


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


@dataclass
class ModelClient:
    """A model behind one endpoint or a pool (`base_url` a list). `base_url` may be a coroutine
    function, called once before the first request that is not in the journal (lazy
    embedded server)."""

    model: str
    base_url: str | list[str] | Callable[[], Awaitable[str]]
    journal: RequestJournal
    api_key: str = "not-needed"
    max_concurrency: int | str = 16  # per endpoint, or "auto" (then `auto_concurrency`)
    auto_concurrency: AutoConcurrency = field(default_factory=AutoConcurrency)
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    stats: ClientStats = field(default_factory=ClientStats)
    budget: Budget | None = None  # the run's caps, shared by its clients (flows/models/budget.py)
    price: Price | None = None  # what this role's tokens cost (the plan and the `cost` cap)
    _pool: EndpointPool | None = field(default=None, init=False, repr=False)
    _endpoint: str = field(default="", init=False, repr=False)
    _start_lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        """The endpoint, or every endpoint of the pool, for messages."""
        if self._endpoint:
            return self._endpoint
        if isinstance(self.base_url, str):
            return self.base_url
        return ", ".join(self.base_url) if isinstance(self.base_url, list) else "embedded"

    @property
    def capacity(self) -> int:
        """The most requests this client may have in flight, over its whole pool."""
        per_endpoint = self.auto_concurrency.max if self.max_concurrency == "auto" else int(self.max_concurrency)
        return per_endpoint * (len(self.base_url) if isinstance(self.base_url, list) else 1)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        sample: int = 0,
        shard: str = "shard",
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatResponse:
        """One completion for `messages`. `params`: temperature, top_p, max_tokens, seed, stop…"""
        params, key = self._keyed(messages, params, sample, tools)
        max_tokens = params.get("max_tokens")
        cached = self.journal.get(key)
        if cached is not None and fits_budget(cached, max_tokens):
            self.stats.replayed += 1
            self.stats.reused_across_budget += int(cached.get("max_tokens") != max_tokens)
            self.stats.answers_latency_s += cached.get("latency_s") or 0.0
            return ChatResponse.from_journal(cached)
        if self.budget is not None:
            self.budget.admit()  # raises BudgetReached: nothing more is sent
        response = await self._fetch_answer(key, shard, messages, params, tools)
        self.journal.record(shard, key, {**response.to_journal(), "max_tokens": max_tokens})
        if self.budget is not None:
            self.budget.spend(response.prompt_tokens, response.completion_tokens, self.price)
        self.stats.sent += 1
        self.stats.answers_latency_s += response.latency_s
        self.stats.prompt_tokens += response.prompt_tokens
        self.stats.completion_tokens += response.completion_tokens
        return response

    def journaled(self, messages: list[dict[str, Any]], params: dict[str, Any], *, sample: int = 0,
                  tools: list[dict[str, Any]] | None = None) -> bool:
        """Whether `chat` with these arguments would replay its answer from the journal."""
        params, key = self._keyed(messages, params, sample, tools)
        cached = self.journal.get(key)
        return cached is not None and fits_budget(cached, params.get("max_tokens"))

    def _keyed(self, messages: list[dict[str, Any]], params: dict[str, Any], sample: int,
               tools: list[dict[str, Any]] | None) -> tuple[dict[str, Any], str]:
        """The parameters as sent (the seed shifted by `sample`) and the request's journal key."""
        params = dict(params)
        if params.get("seed") is not None:
            params["seed"] = int(params["seed"]) + sample
        return params, chat_key(self.model, messages, params, extra=self.extra_body, tools=tools, sample=sample)

    async def _connect(self) -> EndpointPool:
        if self._pool is not None:
            return self._pool
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._pool is None:
                if isinstance(self.base_url, (str, list)):
                    urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
                else:
                    urls = [await self.base_url()]
                pool = EndpointPool([self._open(url.rstrip("/")) for url in urls], self.backoff_base_s)
                self._endpoint, self._pool = pool.name, pool
        return self._pool

    def _open(self, url: str) -> Endpoint:
        auto = self.auto_concurrency if self.max_concurrency == "auto" else None
        limit = auto.start if auto else int(self.max_concurrency)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=auto.max if auto else limit),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        adaptive = AdaptiveLimit(url, auto.start, auto.min, auto.max, auto.latency_factor) if auto else None
        return Endpoint(url, limit, session, adaptive)

    async def _fetch_answer(self, key: str, shard: str, messages: list[dict[str, Any]], params: dict[str, Any],
                            tools: list[dict[str, Any]] | None) -> ChatResponse:
        """The answer to a request the journal could not give; `chat()` journals it under `key`
        in `shard`. Sent here by `_send_with_retries` (which the in-process backends replace);
        the batch client, whose requests are named by their journal key, replaces this instead."""
        return await self._send_with_retries(messages, params, tools)

    async def _send_with_retries(
        self, messages: list[dict[str, Any]], params: dict[str, Any], tools: list[dict[str, Any]] | None
    ) -> ChatResponse:
        pool = await self._connect()
        body: dict[str, Any] = {"model": self.model, "messages": messages, "n": 1, **self.extra_body, **params}
        if tools:
            body["tools"] = tools
        payload = json.dumps(body).encode()  # once for every attempt, and before a slot is held
        attempt, failed_at = 0, None
        while True:
            lease: Lease | None = None
            try:
                lease = await pool.acquire(avoid=failed_at)
                response = await self._send_once(lease.endpoint, payload)
            except Exception as exc:  # noqa: BLE001 - classified right below
                retryable, wait_hint, reason = _classify(exc)
                if lease is not None:
                    failed_at = lease.endpoint
                    # down or overloaded; an unusable answer says nothing about the endpoint
                    if retryable and isinstance(exc, (HTTPStatusError, asyncio.TimeoutError, aiohttp.ClientError)):
                        pool.failed(lease, reason, wait_hint)
                    else:
                        pool.release(lease)
                    if len(pool) > 1:
                        reason = f"{lease.endpoint.url}: {reason}"
                if not retryable:
                    raise ModelRequestError(self.endpoint, self.model, reason) from exc
                if attempt >= self.max_retries:
                    raise ModelRequestError(
                        self.endpoint, self.model, f"{reason} (gave up after {attempt + 1} attempts)"
                    ) from exc
                # in a pool, Retry-After holds back its endpoint, not the request
                wait = wait_hint if len(pool) == 1 else pool.ready_in()
                delay = max(wait or 0.0, self._backoff(attempt))
                where = self.endpoint if len(pool) == 1 else f"pool of {len(pool)}"
                log.warning("%s: %s; retry %d/%d in %.1fs", where, reason, attempt + 1, self.max_retries, delay)
                self.stats.retries += 1
                attempt += 1
                await self.sleep(delay)
            except BaseException:
                if lease is not None:
                    pool.release(lease)
                raise
            else:
                pool.succeeded(lease, response.latency_s)
                return response

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(MAX_BACKOFF_S, self.backoff_base_s * 2**attempt))

    async def _send_once(self, endpoint: Endpoint, payload: bytes) -> ChatResponse:
        started = time.perf_counter()  # after the slot is held: waiting for the limit is not latency
        async with endpoint.session.post(endpoint.chat_url, data=payload, headers=JSON_BODY) as reply:
            text = await reply.text(errors="replace")
            if reply.status != 200:
                raise HTTPStatusError(reply.status, text, reply.headers.get("Retry-After"))
        try:
            completion = json.loads(text)
        except json.JSONDecodeError:
            raise BadResponse(f"answer is not JSON: {text[:200]!r}") from None
        return _parse_completion(completion, time.perf_counter() - started)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None


def _parse_completion(completion: Any, latency: float) -> ChatResponse:
    """Read an OpenAI-style chat completion (a decoded JSON object), strictly."""
    if not isinstance(completion, dict):
        raise BadResponse(f"answer is not a JSON object: {str(completion)[:200]!r}")
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse(f"answer has no choices: {json.dumps(completion)[:200]}")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BadResponse("answer has no message")
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or None
    calls = tuple(
        ToolCall(id=call.get("id") or f"call_{i}", name=call["function"]["name"],
                 arguments=call["function"].get("arguments") or "")
        for i, call in enumerate(message.get("tool_calls") or ())
    )
    finish_reason = choice.get("finish_reason") or "stop"
    if not isinstance(content, str):
        raise BadResponse(f"answer content is not text: {json.dumps(content)[:200]}")
    usage = completion.get("usage") or {}
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    confidence = confidence_of([t["logprob"] for t in tokens if isinstance(t, dict)]) if tokens else None
    return ChatResponse(
        content=content,
        finish_reason=finish_reason,
        reasoning_content=reasoning,
        tool_calls=calls,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        latency_s=round(latency, 4),
        confidence=confidence,
    )


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _error_detail(body: str) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message) if message else body
    except (ValueError, AttributeError):
        return body


def _classify(exc: Exception) -> tuple[bool, float | None, str]:
    """(retry?, server-requested wait, human reason)."""
    if isinstance(exc, HTTPStatusError):
        retryable = exc.status in RETRYABLE_STATUS or exc.status >= 500
        return retryable, _retry_after_seconds(exc.retry_after), f"HTTP {exc.status}: {_short(_error_detail(exc.body))}"
    if isinstance(exc, EndpointsOut):
        return True, exc.ready_in, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return True, None, "request timed out"
    if isinstance(exc, aiohttp.ClientError):
        return True, None, f"connection failed: {type(exc).__name__}: {_short(str(exc))}"
    if isinstance(exc, (BadResponse, ValueError, TypeError, KeyError, AttributeError)):
        return True, None, f"unusable answer: {_short(str(exc))}"
    return False, None, f"{type(exc).__name__}: {_short(str(exc))}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
