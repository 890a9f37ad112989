"""The model roles of a recipe: a teacher (`TeacherSpec`: the embedded model or an
OpenAI-compatible endpoint or pool, its sampling, concurrency, batch mode and price), the
`teachers:` section of DualDistill (`Teachers`) and the self-distillation `student:`
(`StudentSpec`, a teacher plus the backend that produces its samples).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.recipe_base import RecipeError, _Strict

EMBEDDED = "embedded"


class Sampling(_Strict):
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(default=2048, ge=1)  # per request
    seed: int | None = 0  # per-request seed; sample i of a problem is sent with seed + i
    # llama.cpp's server applies 1.1 unless told; None leaves the server default
    repeat_penalty: float | None = None


class AutoConcurrency(_Strict):
    """`max_concurrency: auto`: the in-flight limit grows by one while latency holds and is
    halved when latency climbs past `latency_factor` × its best recent value or errors appear
    (additive increase, multiplicative decrease), within [min, max]."""

    start: int = Field(default=8, ge=1)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=256, ge=1, le=4096)
    latency_factor: float = Field(default=2.0, gt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoConcurrency:
        if not self.min <= self.start <= self.max:
            raise ValueError(f"needs min <= start <= max, got {self.min}, {self.start}, {self.max}")
        return self


class Price(_Strict):
    """What a role's tokens cost, in any currency (the plan and the `cost` budget use it)."""

    prompt_per_mtok: float = Field(ge=0)  # per million prompt tokens
    completion_per_mtok: float = Field(ge=0)  # per million completion tokens
    batch_discount: float = Field(default=0.5, gt=0, le=1)  # price factor with `mode: batch` (OpenAI: half)


class BatchSpec(_Strict):
    """`mode: batch`: requests go out as batch files (Files + Batches API) and are polled."""

    completion_window: str = "24h"
    poll_s: float = Field(default=30.0, gt=0)
    max_requests_per_batch: int = Field(default=50_000, ge=1)
    gather_s: float = Field(default=2.0, ge=0)  # wait this long for more requests before a batch is sent


class TeacherSpec(_Strict):
    """A teacher is the embedded default model, or any OpenAI-compatible endpoint (or a pool
    of them serving one model: `base_url` as a list)."""

    endpoint: Literal["embedded"] | None = None
    base_url: str | list[str] | None = None
    model: str | None = None
    api_key_env: str | None = None  # the name of the variable holding the key, never the key
    sampling: Sampling = Sampling()
    max_concurrency: int | Literal["auto"] = 16  # per endpoint of the pool
    auto_concurrency: AutoConcurrency = AutoConcurrency()
    timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=100)
    prompt: str | None = None  # prompt file name under prompts/ (default per role)
    mode: Literal["online", "batch"] = "online"
    batch: BatchSpec = BatchSpec()
    price: Price | None = None
    # completion tokens per second the endpoint(s) sustain, for `distillery plan` (else the pilot's measure)
    throughput_tokens_per_s: float | None = Field(default=None, gt=0)
    # tool teacher only
    protocol: Literal["tags", "function_calling"] = "tags"
    max_tool_calls: int = Field(default=10, ge=0)

    @field_validator("max_concurrency")
    @classmethod
    def _concurrency_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 4096:
            raise ValueError("must be between 1 and 4096, or `auto`")
        return value

    @model_validator(mode="after")
    def _endpoint_or_url(self) -> TeacherSpec:
        if self.endpoint == EMBEDDED:
            if self.base_url:
                raise ValueError("give either `endpoint: embedded` or `base_url`, not both")
            if self.mode == "batch":
                raise ValueError("`mode: batch` needs a provider with a batch API (`base_url`), not the embedded model")
            return self
        if not self.base_url:
            raise ValueError("needs `endpoint: embedded` or `base_url` + `model`")
        for url in self.base_urls:
            if not re.match(r"^https?://", url):
                raise ValueError(f"`base_url` must start with http:// or https://, got {url!r}")
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError("`base_url` lists the same URL twice")
        if self.mode == "batch" and len(self.base_urls) > 1:
            raise ValueError("`mode: batch` goes to one provider: give one `base_url`")
        if not self.model:
            raise ValueError("`model` is required with `base_url`")
        return self

    @property
    def base_urls(self) -> list[str]:
        """The pool: one URL or several, each serving `model`."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @field_validator("api_key_env")
    @classmethod
    def _looks_like_a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be the *name* of an environment variable (e.g. OPENAI_API_KEY), not a key")
        return value

    @property
    def is_embedded(self) -> bool:
        return self.endpoint == EMBEDDED

    def api_key(self) -> str:
        """The key from the environment; a clear error when the variable is unset."""
        if not self.api_key_env:
            return "not-needed"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RecipeError(f"environment variable {self.api_key_env} (api_key_env) is not set")
        return key


StudentBackend = Literal["endpoint", "vllm", "transformers", "embedded"]


class StudentSpec(TeacherSpec):
    """The student: a teacher-like role plus how its samples are produced (`backend`).

    `endpoint` (default with `base_url`): any OpenAI-compatible server; `embedded` (default
    with `endpoint: embedded`): the embedded model; `transformers` / `vllm`: the checkpoint
    named by `model` (a local folder, or a hub id where the hub is reachable), in process.
    """

    backend: StudentBackend | None = None
    logprobs: bool = True  # ask for token logprobs: sample confidence (recorded for every sample)
    # backend vllm only: keyword arguments of vllm's AsyncEngineArgs (dtype, max_model_len, gpu_memory_utilization…)
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _local_backends_need_no_url(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("backend") in ("transformers", "vllm"):
            if data.get("base_url") or data.get("endpoint"):
                raise ValueError(f"backend {data['backend']} runs in process: give `model`, not `base_url`/`endpoint`")
            if not data.get("model"):
                raise ValueError(f"backend {data['backend']} needs `model` (a checkpoint folder or hub id)")
            if data.get("max_concurrency") == "auto" or data.get("mode") == "batch":
                raise ValueError(f"backend {data['backend']} runs in process: `max_concurrency: auto` and "
                                 "`mode: batch` are for endpoints")
            return {**data, "base_url": "http://in-process"}  # satisfies the teacher checks; never contacted
        return data

    @model_validator(mode="after")
    def _engine_args_are_for_vllm(self) -> StudentSpec:
        if self.engine_args and self.backend_name != "vllm":
            raise ValueError(f"`engine_args` is for backend vllm, not {self.backend_name}")
        return self

    @property
    def backend_name(self) -> StudentBackend:
        return self.backend or ("embedded" if self.is_embedded else "endpoint")


class Teachers(_Strict):
    tool: TeacherSpec
    reasoning: TeacherSpec
