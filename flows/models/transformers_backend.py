"""In-process generation with a Hugging Face causal LM, behind the `ModelClient` interface.

`TransformersClient` is an `InProcessClient` (flows/models/in_process.py): a local checkpoint
instead of an HTTP endpoint. `chat()` (journal keys, budget-aware replay, stats) is inherited
unchanged; only `_load` (the model) and `_send_with_retries` (generate) are its own. A fully
replayed rerun never loads the model.

- `checkpoint`: a folder with a config and weights (`save_pretrained` output), or a GGUF
  file (transformers dequantises it to float32; the embedded SmolLM2 GGUF takes ~35 s to
  load on 2 cores, most of it transformers parsing the GGUF metadata in Python), loaded by
  `load_pretrained` (flows/models/checkpoints.py), the loader every backend shares.
  Loaded once per process and checkpoint, shared by every client that names it.
- CPU, float32, `num_threads` torch threads while generating (set in the generating thread;
  default 1, like the embedded llama.cpp server: on 2 shared cores, 2 OpenMP threads ran
  18x slower than 1 as soon as another process kept one core busy).
- Generation runs in `asyncio.to_thread`, one request at a time per model, so the event
  loop stays free; cancelling the awaiting task stops the generation at the next token.

Sampling, per request (`params`, the OpenAI names; unknown keys are ignored):
- `temperature` (0 = greedy), `top_p`, `top_k`, `min_p`, `max_tokens` (None: up to the
  model's context), `seed` (a fresh `torch.Generator` per request: the same seed and prompt
  give the same output on the same machine and thread count; None draws a random seed),
  `repetition_penalty` / llama.cpp's `repeat_penalty` (HF semantics, over the prompt and the
  completion; llama.cpp only looks at the last 64 tokens), `presence_penalty` and
  `frequency_penalty` (OpenAI semantics, over the completion), `logit_bias` ({token id: bias},
  added to the logits before temperature).
- `stop` (a string or a list): the completion is decoded after every token and generation
  ends as soon as it contains a stop string; the content is cut before the earliest one,
  which is not returned (as OpenAI servers do). It also ends at an EOS token: the model's,
  the generation config's and the tokenizer's, and the added end-of-turn tokens listed in
  END_OF_GENERATION. `finish_reason` is "stop" for both, "length" when `max_tokens` (or the
  context) ran out first.
- `completion_tokens` counts every sampled token, the EOS or the token that completed a stop
  string included: it is the budget the answer needed (what `fits_budget` relies on).
- `logprobs`: when truthy, the log-probability of each sampled token (the same tokens as
  `completion_tokens`) is taken from the distribution it was actually sampled from: after the
  penalties, temperature scaling, top-k, top-p and min-p truncation, renormalised. With
  temperature 0 that distribution is a point mass, so greedy requests record the
  log-softmax of the (penalised) logits at temperature 1 instead. The response carries
  `confidence_of(logprobs)`; the per-token values are not kept.
- `tools` (function calling) is not supported: a request with tools raises
  `ModelRequestError`; use the tag protocol.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.models.checkpoints import CheckpointError, load_pretrained
from flows.models.client import ChatResponse, ModelRequestError
from flows.models.confidence import confidence_of
from flows.models.in_process import InProcessClient
from flows.models.journal import RequestJournal

if TYPE_CHECKING:
    import torch

log = logging.getLogger("distillery.transformers")


class GenerationCancelled(Exception):
    """The awaiting task was cancelled; the generating thread stopped early."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Sampling:
        """The sampling settings of an OpenAI-style request body; raises ValueError on bad values."""

        def number(name: str, default: float, *aliases: str) -> float:
            for key in (name, *aliases):
                if params.get(key) is not None:
                    return float(params[key])
            return default

        stop = params.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {params.get('stop')!r}")
        max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
        sampling = cls(
            temperature=number("temperature", 1.0),
            top_p=number("top_p", 1.0),
            top_k=int(number("top_k", 0)),
            min_p=number("min_p", 0.0),
            max_tokens=None if max_tokens is None else int(max_tokens),
            seed=None if params.get("seed") is None else int(params["seed"]),
            stop=stop,
            logprobs=bool(params.get("logprobs")),
            repetition_penalty=number("repetition_penalty", 1.0, "repeat_penalty"),
            presence_penalty=number("presence_penalty", 0.0),
            frequency_penalty=number("frequency_penalty", 0.0),
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (params.get("logit_bias") or {}).items())),
        )
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or not 0 <= sampling.min_p <= 1:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1: {sampling}")
        if sampling.repetition_penalty <= 0 or (sampling.max_tokens is not None and sampling.max_tokens < 0):
            raise ValueError(f"need repetition_penalty > 0 and max_tokens >= 0: {sampling}")
        return sampling


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[float, ...] | None  # one per sampled token, when asked for


@dataclass
class LoadedModel:
    """A model and its tokenizer, with the lock that lets one generation run at a time."""

    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    max_positions: int | None
    load_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


# Added tokens that end a generation besides the declared EOS (llama.cpp's end-of-generation set)
END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")

_LOADED: dict[tuple[str, str], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def load_checkpoint(checkpoint: str | Path, dtype: str = "float32") -> LoadedModel:
    """The model and tokenizer of a checkpoint folder or GGUF file (loaded once per process)."""
    path = Path(checkpoint).expanduser().resolve()
    key = (str(path), dtype)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(path, dtype)
        return _LOADED[key]


def unload_checkpoint(checkpoint: str | Path, dtype: str = "float32") -> bool:
    """Drop a loaded checkpoint from the process (e.g. the previous round's student);
    clients still holding it keep it until they go. Whether it was loaded."""
    key = (str(Path(checkpoint).expanduser().resolve()), dtype)
    with _LOAD_LOCK:
        return _LOADED.pop(key, None) is not None


def _load(path: Path, dtype: str) -> LoadedModel:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    started = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(path, dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    model.eval()
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{path}: the tokenizer has no chat template")
    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        eos.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    added = tokenizer.get_added_vocab()
    eos.update(added[token] for token in END_OF_GENERATION if token in added)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset(int(i) for i in eos),
        max_positions=getattr(model.config, "max_position_embeddings", None),
        load_s=round(time.perf_counter() - started, 2),
    )
    log.info("loaded %s in %.1fs (eos %s)", path, loaded.load_s, sorted(loaded.eos_ids))
    return loaded


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` rendered with the chat template, ready for the assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text` (None when there is none)."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def generate(
    loaded: LoadedModel,
    prompt_ids: list[int],
    sampling: Sampling,
    cancel: threading.Event | None = None,
) -> Generation:
    """Sample one completion of `prompt_ids` (blocking; call it from a worker thread)."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    room = math.inf if loaded.max_positions is None else loaded.max_positions - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, the model's context {loaded.max_positions}")
    budget = int(min(room, math.inf if sampling.max_tokens is None else sampling.max_tokens))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    picker = _Picker(sampling, generator, prompt_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    finish, text = "length", ""
    if budget == 0:
        return Generation("", "length", len(prompt_ids), 0, () if sampling.logprobs else None)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        while True:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()
            token, logprob = picker.pick(out.logits[0, -1])
            tokens.append(token)
            logprobs.append(logprob)
            if token in loaded.eos_ids:
                finish = "stop"
                text = tokenizer.decode(tokens[:-1], skip_special_tokens=True)
                break
            if sampling.stop:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                at = find_stop(text, sampling.stop)
                if at is not None:
                    finish, text = "stop", text[:at]
                    break
            if len(tokens) >= budget:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                break
            out = model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1
            )
    return Generation(
        text=text,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(tokens),
        logprobs=tuple(logprobs) if sampling.logprobs else None,
    )


class _Picker:
    """Turns next-token logits into a sampled token and its log-probability."""

    def __init__(self, sampling: Sampling, generator: torch.Generator, prompt_ids: list[int]) -> None:
        self.s = sampling
        self.generator = generator
        self.context = list(prompt_ids)  # prompt and completion, for the repetition penalty
        self.counts: dict[int, int] = {}  # completion tokens, for presence/frequency penalties

    def pick(self, logits: torch.Tensor) -> tuple[int, float]:
        import torch

        s = self.s
        logits = logits.float().clone()
        if s.repetition_penalty != 1.0 and self.context:
            seen = torch.tensor(sorted(set(self.context)))
            scores = logits[seen]
            logits[seen] = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        if (s.presence_penalty or s.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts))
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
            logits[ids] -= s.presence_penalty + s.frequency_penalty * counts
        for token_id, bias in s.logit_bias:
            logits[token_id] += bias
        if s.temperature == 0:
            token = int(torch.argmax(logits))
            logprob = float(torch.log_softmax(logits, dim=-1)[token])
        else:
            logits = logits / s.temperature
            if 0 < s.top_k < logits.numel():
                kth = torch.topk(logits, s.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            if s.top_p < 1.0:
                logits = _nucleus(logits, s.top_p)
            if s.min_p > 0:
                probs = torch.softmax(logits, dim=-1)
                logits = logits.masked_fill(probs < s.min_p * probs.max(), -math.inf)
            logprobs = torch.log_softmax(logits, dim=-1)
            token = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
            logprob = float(logprobs[token])
        self.context.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token, logprob


def _nucleus(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """`logits` with every token outside the top-p nucleus at -inf. The nucleus is looked for
    among the `candidates` likeliest tokens first (a full sort of a 49k vocabulary costs ~5 ms
    a token), and in the whole sorted vocabulary when they hold less than `top_p`."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    probs_sorted, order = torch.topk(probs, min(candidates, probs.numel()))
    if probs_sorted.sum() < top_p and probs_sorted.numel() < probs.numel():
        probs_sorted, order = torch.sort(probs, descending=True)
    before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted  # mass of the tokens ranked above
    keep = order[before < top_p]  # the first one always stays
    return torch.full_like(logits, -math.inf).index_copy(0, keep, logits[keep])


@dataclass(init=False, eq=False)
class TransformersClient(InProcessClient):
    """A `ModelClient` that generates in process with a Hugging Face causal LM.

    `model` is the name in the journal keys (the checkpoint path, or `EMBEDDED_MODEL_NAME`
    for the embedded GGUF: then its answers replay for the llama.cpp-served model and back);
    `checkpoint` a folder or a GGUF file. The other ModelClient fields are accepted;
    `base_url`, concurrency, timeouts and retries have no use here.
    """

    num_threads: int = 1
    dtype: str = "float32"

    def __init__(
        self,
        model: str,
        checkpoint: str | Path,
        journal: RequestJournal,
        *,
        num_threads: int = 1,
        dtype: str = "float32",
        **fields: Any,
    ) -> None:
        super().__init__(model, checkpoint, journal, scheme="transformers", **fields)
        self.num_threads = num_threads
        self.dtype = dtype

    @property
    def loaded(self) -> LoadedModel | None:
        """The model, once a request has needed it (None while everything replayed)."""
        return self._model

    def _load(self) -> LoadedModel:
        return load_checkpoint(self.checkpoint, self.dtype)

    async def _send_with_retries(
        self, messages: list[dict[str, Any]], params: dict[str, Any], tools: list[dict[str, Any]] | None
    ) -> ChatResponse:
        self.refuse_tools(tools)
        try:
            sampling = Sampling.from_params({**self.extra_body, **params})
        except (TypeError, ValueError) as exc:
            raise ModelRequestError(self.endpoint, self.model, f"bad sampling parameters: {exc}") from exc
        try:
            loaded = await self._connect()
        except Exception as exc:  # noqa: BLE001 - reported with its cause
            raise ModelRequestError(
                self.endpoint, self.model, f"could not load {self.checkpoint}: {type(exc).__name__}: {exc}"
            ) from exc
        cancel = threading.Event()
        async with self.per_loop(asyncio.Lock):
            try:
                return await asyncio.to_thread(self._answer, loaded, messages, sampling, cancel)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001 - nothing to retry in process
                raise ModelRequestError(self.endpoint, self.model, f"{type(exc).__name__}: {exc}") from exc

    def _answer(
        self, loaded: LoadedModel, messages: list[dict[str, Any]], sampling: Sampling, cancel: threading.Event
    ) -> ChatResponse:
        import torch

        with loaded.lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(self.num_threads)
            try:
                started = time.perf_counter()
                prompt_ids = render_prompt(loaded.tokenizer, messages)
                generation = generate(loaded, prompt_ids, sampling, cancel)
                latency = time.perf_counter() - started
            finally:
                torch.set_num_threads(threads)
        return ChatResponse(
            content=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            latency_s=round(latency, 4),
            confidence=confidence_of(generation.logprobs) if generation.logprobs is not None else None,
        )

    async def aclose(self) -> None:
        """Nothing to close: the model stays loaded for the next client that names it."""
