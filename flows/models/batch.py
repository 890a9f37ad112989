"""`mode: batch`: a teacher's requests go out as batch files (OpenAI's Files + Batches API,
and the providers that copy it), at the provider's batch price.

`BatchClient` is a `ModelClient`: `chat()` (journal lookup, budget, stats, journaling) is
inherited unchanged; only the sending differs (`_fetch_answer`, given the journal key and shard).

- Concurrent requests are gathered — until `batch.gather_s` passes with no new one, or
  `max_requests_per_batch` are waiting — into one JSONL input file, one line per request:
  `custom_id` is the request's journal key, `body` what `ModelClient` would have posted.
  The file is uploaded, a batch created, and the batch polled every `poll_s` until it
  ends; each result line is parsed like an online answer and handed to its caller,
  which journals it.
- Each submitted batch is written to `<journal dir>/batches/<batch_id>.json` (its id,
  input file, custom_ids with their shard and `max_tokens`, status) as soon as the
  provider accepts it. After a restart, a request that belongs to a batch still under
  way waits for that batch instead of being sent again; when a batch ends, every answer
  in it is journaled, asked for this time or not, so a rerun finds them all.
- A result line with an error fails that request alone (`ModelRequestError` naming the
  batch and the custom_id); a batch that fails, expires or is cancelled fails the
  requests it did not answer. Nothing that failed is journaled, so a rerun sends it again
  in a new batch.
- The `max_concurrency` of a batch client is `max_requests_per_batch`: it bounds the
  problems under way (`Runtime.problem_slots`), and a batch should hold them all.

The tool teacher works in batch mode too, but each of its turns (the code it writes, then
the answer after the code ran) is a request of its own, so each turn becomes its own batch:
a problem with three code runs waits for four batches. Batch mode suits single-turn roles
(the reasoning teacher, the leakage teachers) best.

The SDK calls go through `openai.AsyncOpenAI` (one per event loop, as Prefect may run tasks
on several); the `openai` package is needed only when a role uses `mode: batch`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.models.client import (
    BadResponse,
    ChatResponse,
    ModelClient,
    ModelRequestError,
    _parse_completion,
    _short,
)
from schemas.recipe import BatchSpec

log = logging.getLogger("distillery.batch")

BATCH_ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class _Request:
    custom_id: str
    body: dict[str, Any]
    shard: str
    budget: int | None  # max_tokens: not in the key, so it decides which batch may answer
    future: asyncio.Future[ChatResponse]


@dataclass
class _Batch:
    """A submitted batch as persisted in `batches/<id>.json`."""

    batch_id: str
    input_file_id: str
    created: float
    requests: dict[str, dict[str, Any]]  # custom_id -> {"shard", "max_tokens"}
    status: str = "submitted"
    answered: list[str] = field(default_factory=list)  # custom_ids with a usable answer, once ended

    def routes(self) -> dict[str, dict[str, Any]]:
        """The requests a rerun should take from this batch instead of sending again."""
        if self.status not in TERMINAL:
            return self.requests
        return {cid: self.requests[cid] for cid in self.answered if cid in self.requests}


@dataclass
class _Outcome:
    batch_id: str
    answers: dict[str, ChatResponse]
    errors: dict[str, str]
    missing: str  # the reason for a custom_id that has neither


class _Loop:
    """One event loop's share of the client: its SDK client, the requests being gathered,
    and the batches it is polling."""

    def __init__(self, client: BatchClient) -> None:
        self.openai = client._make_openai()
        self.queue: list[_Request] = []
        self.unsent: dict[tuple[str, int | None], _Request] = {}  # gathered or being uploaded
        self.arrived = asyncio.Event()
        self.waiting: dict[str, dict[str, list[_Request]]] = {}  # batch id -> custom_id -> callers
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.gatherer: asyncio.Task[None] | None = None

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


@dataclass(eq=False)
class BatchClient(ModelClient):
    """A `ModelClient` that sends through the provider's batch API. `base_url` is the
    provider's API root (`https://api.openai.com/v1`); `batch_dir` defaults to
    `<journal dir>/batches`."""

    batch: BatchSpec = field(default_factory=BatchSpec)
    batch_dir: Path | None = None

    def __post_init__(self) -> None:
        if hasattr(super(), "__post_init__"):
            super().__post_init__()  # type: ignore[misc]
        self.max_concurrency = self.batch.max_requests_per_batch
        if self.batch_dir is None:
            self.batch_dir = Path(self.journal.directory) / "batches"
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the persisted batches, shared by every loop
        self._batches: dict[str, _Batch] | None = None
        self._routes: dict[str, tuple[str, int | None]] = {}  # custom_id -> (batch id, max_tokens)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url} (batch)" if isinstance(self.base_url, str) else "batch"

    # --- sending ------------------------------------------------------------------

    async def _fetch_answer(self, custom_id: str, shard: str, messages: list[dict[str, Any]], params: dict[str, Any],
                            tools: list[dict[str, Any]] | None) -> ChatResponse:
        """Wait for the request's answer from a batch: one still under way that holds it, or the
        next one gathered. `custom_id` is the journal key `chat()` looked up."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "n": 1, **self.extra_body, **params}
        if tools:
            body["tools"] = tools
        budget = params.get("max_tokens")
        state = await self._connect()
        # no await from here until the request is registered: chat()'s journal lookup and
        # this routing happen in one step, so an answer journaled meanwhile is never missed
        self._load_batches()
        same = state.unsent.get((custom_id, budget))
        if same is not None:  # the same request twice at once: one line, both callers answered
            return await asyncio.shield(same.future)
        request = _Request(custom_id, body, shard, budget, asyncio.get_running_loop().create_future())
        route = self._routes.get(custom_id)
        if route is not None and route[1] == budget:
            self._wait_for(state, route[0], request)
        else:
            state.unsent[(custom_id, budget)] = request
            state.queue.append(request)
            state.arrived.set()
            if state.gatherer is None or state.gatherer.done():
                state.gatherer = state.spawn(self._gather(state), "batch-gatherer")
        return await asyncio.shield(request.future)

    async def _connect(self) -> _Loop:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _Loop(self)
        return state

    def _make_openai(self) -> Any:
        try:
            import openai
        except ImportError as exc:
            raise ModelRequestError(self.endpoint, self.model,
                                    "`mode: batch` needs the openai package (pip install openai)") from exc
        if not isinstance(self.base_url, str):
            raise ModelRequestError(self.endpoint, self.model, "`mode: batch` needs a provider's `base_url`")
        return openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout_s,
                                  max_retries=self.max_retries)

    async def _gather(self, state: _Loop) -> None:
        """Cut the queue into batches: after `gather_s` with no new request, or when full."""
        limit = self.batch.max_requests_per_batch
        while state.queue:
            while len(state.queue) < limit:
                state.arrived.clear()
                try:
                    await asyncio.wait_for(state.arrived.wait(), self.batch.gather_s)
                except asyncio.TimeoutError:
                    break
            chosen: dict[str, _Request] = {}
            rest: list[_Request] = []
            for request in state.queue:  # a custom_id once per batch (another max_tokens waits for the next)
                if request.future.done():
                    continue
                if request.custom_id in chosen or len(chosen) >= limit:
                    rest.append(request)
                else:
                    chosen[request.custom_id] = request
            state.queue = rest
            if chosen:
                state.spawn(self._submit(state, list(chosen.values())), "batch-submit")

    async def _submit(self, state: _Loop, requests: list[_Request]) -> None:
        lines = "".join(
            json.dumps({"custom_id": r.custom_id, "method": "POST", "url": BATCH_ENDPOINT, "body": r.body},
                       ensure_ascii=False) + "\n"
            for r in requests
        )
        try:
            upload = await state.openai.files.create(
                file=("distillery-batch.jsonl", lines.encode(), "application/jsonl"), purpose="batch")
            created = await state.openai.batches.create(
                input_file_id=upload.id, endpoint=BATCH_ENDPOINT, completion_window=self.batch.completion_window)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the cause
            error = self._error(f"could not submit a batch of {len(requests)} request(s): {_describe(exc)}")
            for request in requests:
                state.unsent.pop((request.custom_id, request.budget), None)
                _fail(request.future, error)
            return
        batch = _Batch(
            batch_id=created.id, input_file_id=upload.id, created=time.time(),
            requests={r.custom_id: {"shard": r.shard, "max_tokens": r.budget} for r in requests},
        )
        self._save(batch)
        log.info("%s: batch %s submitted: %d request(s) (input file %s)",
                 self.endpoint, batch.batch_id, len(requests), upload.id)
        for request in requests:
            state.unsent.pop((request.custom_id, request.budget), None)
            self._wait_for(state, batch.batch_id, request)

    # --- waiting ------------------------------------------------------------------

    def _wait_for(self, state: _Loop, batch_id: str, request: _Request) -> None:
        state.waiting.setdefault(batch_id, {}).setdefault(request.custom_id, []).append(request)
        if batch_id not in state.watchers:
            state.watchers[batch_id] = state.spawn(self._watch(state, batch_id), f"batch-{batch_id}")

    async def _watch(self, state: _Loop, batch_id: str) -> None:
        """Follow one batch to its end and answer its callers (a caller that comes later,
        which only a crash between download and journal allows, starts a new watch)."""
        try:
            outcome = await self._follow(state, batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch stays submitted: a rerun polls it again
            error = self._error(f"batch {batch_id}: {_describe(exc)}; it stays submitted, rerun to resume")
            for requests in state.waiting.pop(batch_id, {}).values():
                for request in requests:
                    _fail(request.future, error)
            return
        finally:
            state.watchers.pop(batch_id, None)
        for requests in state.waiting.pop(batch_id, {}).values():
            for request in requests:
                _settle(request, outcome, self._error)

    async def _follow(self, state: _Loop, batch_id: str) -> _Outcome:
        """Poll until the batch ends, download its results, journal every answer nobody here waits for."""
        failures = 0
        while True:
            try:
                remote = await state.openai.batches.retrieve(batch_id)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a provider hiccup during a long wait
                failures += 1
                if failures > self.max_retries:
                    raise RuntimeError(f"polling failed {failures} times in a row: {_describe(exc)}") from exc
                log.warning("%s: polling batch %s failed (%s); trying again in %.0fs",
                            self.endpoint, batch_id, _describe(exc), self.batch.poll_s)
                await self.sleep(self.batch.poll_s)
                continue
            if remote.status in TERMINAL:
                break
            await self.sleep(self.batch.poll_s)
        batch = self._batches_snapshot()[batch_id]
        latency = round(time.time() - batch.created, 4)
        answers: dict[str, ChatResponse] = {}
        errors: dict[str, str] = {}
        for file_id in (remote.output_file_id, remote.error_file_id):
            if file_id:
                content = await state.openai.files.content(file_id)
                _read_results(content.text, latency, answers, errors)
        if remote.status == "completed":
            missing = f"batch {batch_id} completed without a result for this request"
        else:
            missing = f"batch {batch_id} {remote.status}" + (f": {detail}" if (detail := _batch_errors(remote)) else "")
        waited = set(state.waiting.get(batch_id, {}))
        self._journal_unwaited(batch, answers, waited)
        batch.status, batch.answered = remote.status, sorted(answers)
        self._save(batch)
        log.info("%s: batch %s %s: %d answered, %d failed, of %d",
                 self.endpoint, batch_id, remote.status, len(answers), len(batch.requests) - len(answers),
                 len(batch.requests))
        return _Outcome(batch_id, answers, errors, missing)

    def _journal_unwaited(self, batch: _Batch, answers: dict[str, ChatResponse], waited: set[str]) -> None:
        """Journal the answers no caller here will journal (a waiting caller's chat() does it)."""
        for custom_id, response in answers.items():
            if custom_id in waited or custom_id not in batch.requests:
                continue
            meta = batch.requests[custom_id]
            known = self.journal.get(custom_id)
            if known is not None and known.get("max_tokens") == meta["max_tokens"]:
                continue
            self.journal.record(meta["shard"], custom_id, {**response.to_journal(), "max_tokens": meta["max_tokens"]})

    def _error(self, message: str) -> ModelRequestError:
        return ModelRequestError(self.endpoint, self.model, message)

    # --- persisted batches ----------------------------------------------------------

    def _load_batches(self) -> None:
        if self._batches is not None:
            return
        with self._lock:
            if self._batches is not None:
                return
            batches: dict[str, _Batch] = {}
            for path in sorted(self.batch_dir.glob("*.json")) if self.batch_dir.exists() else ():
                try:
                    batch = _Batch(**json.loads(path.read_text(encoding="utf-8")))
                except (json.JSONDecodeError, TypeError) as exc:
                    log.warning("%s: unreadable batch record skipped (%s)", path, exc)
                    continue
                batches[batch.batch_id] = batch
                pending = batch.status not in TERMINAL
                if pending:
                    log.info("%s: batch %s (%d request(s)) still %s: its requests wait for it",
                             self.endpoint, batch.batch_id, len(batch.requests), batch.status)
                for custom_id, meta in batch.routes().items():
                    self._routes[custom_id] = (batch.batch_id, meta["max_tokens"])
            self._batches = batches

    def _batches_snapshot(self) -> dict[str, _Batch]:
        with self._lock:
            return dict(self._batches or {})

    def _save(self, batch: _Batch) -> None:
        """Write the batch record (atomically) and route its requests to it."""
        with self._lock:
            assert self.batch_dir is not None
            self.batch_dir.mkdir(parents=True, exist_ok=True)
            path = self.batch_dir / f"{batch.batch_id}.json"
            scratch = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            scratch.write_text(json.dumps(vars(batch), indent=1), encoding="utf-8")
            os.replace(scratch, path)
            if self._batches is None:
                self._batches = {}
            self._batches[batch.batch_id] = batch
            for custom_id, (batch_id, _) in list(self._routes.items()):
                if batch_id == batch.batch_id:
                    del self._routes[custom_id]
            for custom_id, meta in batch.routes().items():
                self._routes[custom_id] = (batch.batch_id, meta["max_tokens"])

    async def aclose(self) -> None:
        """Stop gathering and polling in this event loop; callers still waiting get an error
        (their batches stay submitted: a rerun resumes them)."""
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is None:
            return
        for task in list(state.tasks):
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        for batch_id, callers in state.waiting.items():
            error = self._error(f"closed while batch {batch_id} was under way; it stays submitted, rerun to resume")
            for requests in callers.values():
                for request in requests:
                    _fail(request.future, error)
        closed = self._error("closed before the request was submitted in a batch")
        for request in state.queue + list(state.unsent.values()):
            _fail(request.future, closed)
        await state.openai.close()


def _read_results(text: str, latency: float, answers: dict[str, ChatResponse], errors: dict[str, str]) -> None:
    """One output or error file: each line answers one custom_id, with a completion or an error."""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            result = json.loads(line)
            custom_id = result["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("unreadable batch result line skipped: %s", _short(line, 200))
            continue
        response = result.get("response") or {}
        status = response.get("status_code")
        if result.get("error") or status != 200:
            errors[custom_id] = _line_error(result.get("error"), status, response.get("body"))
            continue
        try:
            answers[custom_id] = _parse_completion(response.get("body"), latency)
        except (BadResponse, ValueError, TypeError, KeyError, AttributeError) as exc:
            errors[custom_id] = f"unusable answer: {_short(str(exc))}"


def _line_error(error: Any, status: Any, body: Any) -> str:
    if isinstance(error, dict) and (error.get("message") or error.get("code")):
        return _short(f"{error.get('code') or 'error'}: {error.get('message') or ''}".rstrip(": "))
    detail = body.get("error") if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message") or detail
    return _short(f"HTTP {status}: {detail}")


def _batch_errors(remote: Any) -> str:
    errors = getattr(getattr(remote, "errors", None), "data", None) or []
    return "; ".join(_short(f"{e.code or 'error'}: {e.message or ''}", 200) for e in errors[:3])


def _settle(request: _Request, outcome: _Outcome, error: Any) -> None:
    answer = outcome.answers.get(request.custom_id)
    if answer is not None:
        if not request.future.done():
            request.future.set_result(answer)
        return
    reason = outcome.errors.get(request.custom_id)
    message = f"batch {outcome.batch_id}, request {request.custom_id}: {reason}" if reason else outcome.missing
    _fail(request.future, error(message))


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: an abandoned future must not log "never retrieved"


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = f"HTTP {status}: {exc}" if status else f"{type(exc).__name__}: {exc}"
    return _short(text)
