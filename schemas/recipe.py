"""The recipe: one YAML file that says everything a run does.

`load_recipe(path, job=...)` validates it before any model is called; a bad recipe raises
`RecipeError` whose message names the file and the field (`teachers.tool.base_url`). Each
job needs its own sections (`JOB_SECTIONS`): DualDistill `problems` + `teachers`;
self-distillation `problems` + `student` + `self_distill` (+ `teachers` to generate the
teacher part).

The sections of one job have modules of their own, all re-exported here: recipe_teachers.py
(`teachers:`, `student:`), recipe_self_distill.py, recipe_leakage.py,
recipe_decontaminate.py; recipe_base.py holds the strict base model and `RecipeError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from schemas.recipe_base import RecipeError, _Strict
from schemas.recipe_decontaminate import (
    BenchmarkColumns,
    BenchmarkSpec,
    DecontaminateSpec,
)
from schemas.recipe_leakage import (
    LEAKAGE_TESTS,
    BehavioralSpec,
    LeakageDetectorsSpec,
    LeakageFilterSpec,
    LeakageSpec,
    LeakageTeacherSpec,
)
from schemas.recipe_self_distill import SelfDistillSpec, TrainerSpec
from schemas.recipe_teachers import (
    EMBEDDED,
    AutoConcurrency,
    BatchSpec,
    Price,
    Sampling,
    StudentBackend,
    StudentSpec,
    Teachers,
    TeacherSpec,
)

# Every section's names, importable from here as before the sections had modules of their own.
__all__ = [
    "BUILTIN_ARITHMETIC", "EMBEDDED", "JOB_SECTIONS", "LEAKAGE_TESTS", "OUTPUT_MIRRORS", "AutoConcurrency",
    "BatchSpec", "BehavioralSpec", "BenchmarkColumns", "BenchmarkSpec", "BudgetSpec", "ColumnMap",
    "DecontaminateSpec", "ExecutionSpec", "HubSpec", "Job", "LeakageDetectorsSpec", "LeakageFilterSpec",
    "LeakageSpec", "LeakageTeacherSpec", "PlanSpec", "Price", "ProblemsSpec", "PublishSpec", "Recipe",
    "RecipeError", "Sampling", "SandboxSpec", "SelfDistillSpec", "StitchingSpec", "StudentBackend",
    "StudentSpec", "TeacherSpec", "Teachers", "TrainerSpec", "check_job", "flow_recipe", "is_url", "job_of",
    "load_recipe", "parse_recipe",
]

BUILTIN_ARITHMETIC = "builtin:arithmetic"


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
    max_parallel: int | None = Field(default=None, ge=1)  # blocks running at once; None: CPU count
    max_sessions: int = Field(default=64, ge=1)  # live interpreters (one per trajectory); idle ones beyond: evicted, LRU


class BudgetSpec(_Strict):
    """Caps on what the requests of this output folder may spend, counted over every run
    (the journal's answers included). Reached: no new request is sent, what is in flight is
    journaled, the run stops with a clear message; rerun with a larger cap to continue."""

    tokens: int | None = Field(default=None, ge=1)  # prompt + completion tokens
    cost: float | None = Field(default=None, gt=0)  # in the currency of the roles' `price`
    requests: int | None = Field(default=None, ge=1)


class PlanSpec(_Strict):
    pilot: int = Field(default=0, ge=0)  # problems (or prompts) `distillery plan` sends for real, seeded; 0: none


class ExecutionSpec(_Strict):
    """Where shards run: threads in this process (default), or a Dask or Ray cluster."""

    task_runner: Literal["threads", "dask", "ray"] = "threads"
    address: str | None = None  # dask scheduler / ray address; None: start a local cluster
    workers: int = Field(default=2, ge=1)  # local cluster size


class HubSpec(_Strict):
    """Push the published datasets to a Hugging Face Hub dataset repo after the run."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # "org/name"
    private: bool = True
    token_env: str = "HF_TOKEN"  # the environment variable holding the write token
    endpoint: str | None = None  # default: the HF_ENDPOINT variable, else huggingface.co


class PublishSpec(_Strict):
    push_to_hub: HubSpec | None = None


OUTPUT_MIRRORS = Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery")) / "outputs"


def is_url(location: str) -> bool:
    """An fsspec URL such as s3://bucket/prefix (a Windows drive letter is not one)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", location) is not None


class Recipe(_Strict):
    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # a folder, or any fsspec URL (s3://bucket/prefix, gs://…): see `work_dir`
    output_dir: str = Field(min_length=1)
    problems: ProblemsSpec | None = None
    teachers: Teachers | None = None
    student: StudentSpec | None = None
    self_distill: SelfDistillSpec | None = None
    leakage: LeakageSpec | None = None
    decontaminate: DecontaminateSpec | None = None  # DualDistill and self-distillation: keep benchmark items out
    stitching: StitchingSpec = StitchingSpec()
    sandbox: SandboxSpec = SandboxSpec()
    shard_size: int = Field(default=250, ge=1)  # problems per Prefect task
    shard_retries: int = Field(default=1, ge=0)  # Prefect retries of a failed shard (the journal keeps its answers)
    system_prompt: str | None = None  # system message of the published SFT conversation
    publish: PublishSpec = PublishSpec()
    budget: BudgetSpec = BudgetSpec()
    plan: PlanSpec = PlanSpec()
    execution: ExecutionSpec = ExecutionSpec()

    @property
    def remote_output(self) -> str | None:
        """`output_dir` when it is a URL (s3://…), else None."""
        return self.output_dir if is_url(self.output_dir) else None

    @property
    def work_dir(self) -> Path:
        """The local folder a run writes to: `output_dir` itself, or for a URL a mirror under
        ~/.cache/distillery/outputs/ that is synced with it (flows/publishing/storage.py)."""
        if self.remote_output is None:
            return Path(self.output_dir)
        digest = hashlib.sha256(self.output_dir.rstrip("/").encode()).hexdigest()[:16]
        return OUTPUT_MIRRORS / f"{self.run_name}-{digest}"

    @property
    def state_dir(self) -> Path:
        """Where a run keeps what makes it resumable (the request journal)."""
        return self.work_dir / ".distillery"


Job = Literal["dualdistill", "self_distill", "leakage"]
JOB_SECTIONS: dict[str, tuple[str, ...]] = {
    "dualdistill": ("problems", "teachers"),
    "self_distill": ("problems", "student", "self_distill"),
    "leakage": ("leakage",),
}


def job_of(recipe: Recipe) -> Job:
    """The job a recipe describes, by the sections it has."""
    return "leakage" if recipe.leakage else "self_distill" if recipe.self_distill else "dualdistill"


def check_job(recipe: Recipe, job: Job, source: str = "<recipe>") -> Recipe:
    """The recipe has every section `job` needs; the error names the missing ones."""
    needed = list(JOB_SECTIONS[job])
    if job == "self_distill" and recipe.self_distill and recipe.self_distill.teacher_part == "generate":
        needed.append("teachers")
    missing = [name for name in needed if getattr(recipe, name) is None]
    if missing:
        raise RecipeError(f"{source}: the {job} job needs " + ", ".join(f"`{name}:`" for name in missing))
    if job == "leakage" and recipe.decontaminate is not None:
        raise RecipeError(f"{source}: `decontaminate:` is for the dualdistill and self_distill jobs, not {job}")
    return recipe


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
    def resolved(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    update: dict[str, object] = {}
    if not is_url(recipe.output_dir):
        update["output_dir"] = str(resolved(Path(recipe.output_dir)))
    if recipe.problems is not None:
        source = recipe.problems.source
        if not source.startswith("builtin:") and not Path(source).is_absolute():
            source = str(base_dir / source)
        update["problems"] = recipe.problems.model_copy(update={"source": source})
    if recipe.decontaminate is not None:  # a path that is not there here may be a hub dataset name
        against = [b.model_copy(update={"source": str(base_dir / b.source)})
                   if not Path(b.source).is_absolute() and (base_dir / b.source).exists() else b
                   for b in recipe.decontaminate.against]
        update["decontaminate"] = recipe.decontaminate.model_copy(update={"against": against})
    if recipe.self_distill is not None and recipe.self_distill.reuse_from is not None:
        update["self_distill"] = recipe.self_distill.model_copy(
            update={"reuse_from": resolved(recipe.self_distill.reuse_from)})
    return recipe.model_copy(update=update)


def load_recipe(path: str | Path, base_dir: Path | None = None, job: Job | None = None) -> Recipe:
    """Read and validate a YAML recipe. Relative paths resolve against `base_dir`
    (default: the current directory, where the user runs `distillery`); with `job`, the
    sections that job needs must be there."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    recipe = parse_recipe(data, source=str(path), base_dir=base_dir or Path.cwd())
    return check_job(recipe, job, str(path)) if job else recipe


def flow_recipe(recipe_path: str | None, recipe: dict | None, job: Job) -> Recipe:
    """The recipe a flow run works on: the YAML file at `recipe_path`, or `recipe`, the
    recipe's content passed as a deployment parameter (so a worker on another machine needs
    no local file; relative paths then resolve against the worker's working directory)."""
    if recipe is not None:
        source = "deployment parameter `recipe`"
        return check_job(parse_recipe(recipe, source=source, base_dir=Path.cwd()), job, source)
    if not recipe_path:
        raise RecipeError(f"the {job} flow needs `recipe_path` (a YAML file) or `recipe` (its content)")
    return load_recipe(recipe_path, job=job)
