"""The recipe: one YAML file that says everything a DualDistill run does.

`load_recipe(path)` validates it before any model is called; a bad recipe raises
`RecipeError` whose message names the file and the field (`teachers.tool.base_url`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED = "embedded"
BUILTIN_ARITHMETIC = "builtin:arithmetic"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMap(_Strict):
    """Which source columns hold the problem, the gold answer and (optionally) the id."""

    problem: str = "problem"
    answer: str = "answer"
    id: str | None = None  # absent: a stable id is derived from the problem text


class ProblemsSpec(_Strict):
    source: str  # .jsonl, .parquet, a local HF dataset folder, or "builtin:arithmetic"
    limit: int | None = Field(default=None, ge=1)  # first N problems (generator: how many)
    seed: int = 0  # generator seed; with `shuffle`, the shuffle seed
    shuffle: bool = False  # shuffle before `limit` is applied
    split: str = "train"  # split to read from a dataset folder
    columns: ColumnMap = ColumnMap()

    @model_validator(mode="after")
    def _generator_needs_limit(self) -> ProblemsSpec:
        if self.source == BUILTIN_ARITHMETIC and self.limit is None:
            raise ValueError("`limit` is required with source builtin:arithmetic (how many to generate)")
        return self


class Sampling(_Strict):
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(default=2048, ge=1)  # per request
    seed: int | None = 0  # per-request seed; sample i of a problem is sent with seed + i
    # llama.cpp's server applies 1.1 unless told; None leaves the server default
    repeat_penalty: float | None = None


class TeacherSpec(_Strict):
    """A teacher is the embedded default model, or any OpenAI-compatible endpoint."""

    endpoint: Literal["embedded"] | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None  # the name of the variable holding the key, never the key
    sampling: Sampling = Sampling()
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=100)
    prompt: str | None = None  # prompt file name under prompts/ (default per role)
    # tool teacher only
    protocol: Literal["tags", "function_calling"] = "tags"
    max_tool_calls: int = Field(default=10, ge=0)

    @model_validator(mode="after")
    def _endpoint_or_url(self) -> TeacherSpec:
        if self.endpoint == EMBEDDED:
            if self.base_url:
                raise ValueError("give either `endpoint: embedded` or `base_url`, not both")
            return self
        if not self.base_url:
            raise ValueError("needs `endpoint: embedded` or `base_url` + `model`")
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"`base_url` must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("`model` is required with `base_url`")
        return self

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


class Teachers(_Strict):
    tool: TeacherSpec
    reasoning: TeacherSpec


class StitchingSpec(_Strict):
    order: Literal["tool_first", "reasoning_first", "random", "both"] = "both"
    seed: int = 0  # for order: random
    transitions: str = "transitions"  # prompt file with the transition phrases


class SandboxSpec(_Strict):
    kind: Literal["auto", "bwrap", "process"] = "auto"  # auto: bwrap when it works here
    # The reference code used 3 s; `import sympy` alone takes ~1.5 s on a busy 2-core machine.
    wall_time_s: float = Field(default=10.0, gt=0)
    cpu_time_s: int = Field(default=5, ge=1)
    memory_mb: int = Field(default=512, ge=32)
    max_processes: int = Field(default=16, ge=1)
    max_output_chars: int = Field(default=2000, ge=100)
    max_parallel: int | None = Field(default=None, ge=1)  # concurrent snippets; None: CPU count


class Recipe(_Strict):
    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: Path
    problems: ProblemsSpec
    teachers: Teachers
    stitching: StitchingSpec = StitchingSpec()
    sandbox: SandboxSpec = SandboxSpec()
    shard_size: int = Field(default=250, ge=1)  # problems per Prefect task
    shard_retries: int = Field(default=1, ge=0)  # Prefect retries of a failed shard (the journal keeps its answers)
    system_prompt: str | None = None  # system message of the published SFT conversation

    @property
    def state_dir(self) -> Path:
        """Where a run keeps what makes it resumable (the request journal)."""
        return self.output_dir / ".distillery"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_recipe(data: object, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid recipe"]
        for err in exc.errors():
            lines.append(f"  {_field_path(err['loc'])}: {err['msg']}")
        raise RecipeError("\n".join(lines)) from None
    if base_dir is not None:
        recipe = _resolve_paths(recipe, base_dir)
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    output_dir = recipe.output_dir if recipe.output_dir.is_absolute() else base_dir / recipe.output_dir
    source = recipe.problems.source
    if not source.startswith("builtin:") and not Path(source).is_absolute():
        source = str(base_dir / source)
    problems = recipe.problems.model_copy(update={"source": source})
    return recipe.model_copy(update={"output_dir": output_dir, "problems": problems})


def load_recipe(path: str | Path, base_dir: Path | None = None) -> Recipe:
    """Read and validate a YAML recipe. Relative paths resolve against `base_dir`
    (default: the current directory, where the user runs `distillery`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, source=str(path), base_dir=base_dir or Path.cwd())
