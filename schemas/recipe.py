"""The recipe: one YAML file that says everything a run does.

`load_recipe(path, job=...)` validates it before any model is called; a bad recipe raises
`RecipeError` whose message names the file and the field (`teachers.tool.base_url`). Each
job needs its own sections (`JOB_SECTIONS`): DualDistill `problems` + `teachers`;
self-distillation `problems` + `student` + `self_distill` (+ `teachers` to generate the
teacher part).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

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


class BenchmarkColumns(_Strict):
    """Which benchmark columns hold the problem text and (optionally) its id."""

    problem: str = "problem"
    answer: str | None = None  # accepted so a `problems.columns` mapping can be copied; never read
    id: str | None = None  # absent: an item is named by its row


class BenchmarkSpec(_Strict):
    """A benchmark whose items must stay out of the data, read like `problems:`."""

    source: str  # .jsonl, .parquet, a local HF dataset folder, or a hub dataset name (needs the network)
    name: str | None = None  # in the counts and `contaminated/` rows; default: the source's file name
    split: str = "test"  # split to read from a dataset folder or the hub
    columns: BenchmarkColumns = BenchmarkColumns()

    @property
    def label(self) -> str:
        return self.name or Path(self.source.rstrip("/")).stem or self.source


class DecontaminateSpec(_Strict):
    """Problems that copy a benchmark item are set aside before any model call, after
    `problems.limit` (flows/inputs/decontamination.py says how matching works)."""

    against: list[BenchmarkSpec] = Field(min_length=1)  # benchmarks; a problem counts for the first it matches
    ngram: int = Field(default=8, ge=0)  # a shared run of this many words (lowercased, no punctuation) flags; 0 = off
    fuzzy: float = Field(default=95, ge=0, le=100)  # rapidfuzz ratio of the whole texts at least this flags; 0 = off
    # an n-gram found in this many benchmark items or more is boilerplate ("express your answer as a
    # common fraction"), not a copy; 0 = every n-gram counts
    common: int = Field(default=5, ge=0)

    @model_validator(mode="after")
    def _names_unique(self) -> DecontaminateSpec:
        labels = [benchmark.label for benchmark in self.against]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"benchmark names must be unique; give `name:` to tell apart {', '.join(twice)}")
        return self


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
    # backend vllm only: keyword arguments of vllm.LLM (dtype, max_model_len, gpu_memory_utilization…)
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


class TrainerSpec(_Strict):
    kind: Literal["none", "command", "hf"] = "none"
    # kind command: a shell line; {dataset} {round} {student} {output} are filled in, and the
    # last line it prints names the next student (a checkpoint folder or model name)
    command: str | None = None
    # kind hf: transformers SFT of small models on the round's rows, honouring train_detail
    epochs: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=2048, ge=16)

    @model_validator(mode="after")
    def _command_needs_a_template(self) -> TrainerSpec:
        if self.kind == "command" and not (self.command or "").strip():
            raise ValueError("`command` is required with kind: command")
        return self


class SelfDistillSpec(_Strict):
    k: int = Field(default=16, ge=1)  # samples per problem
    beta1: float = Field(default=0.0, ge=0.0, le=1.0)  # mean score > beta1: a verification example
    beta2: float = Field(default=0.9, ge=0.0, le=1.0)  # mean score < beta2: a correction example
    # paper: the two rules as written; reference: verification also needs mean score < beta2
    rule: Literal["paper", "reference"] = "paper"
    rounds: int = Field(default=1, ge=1)
    pick: Literal["random", "most_confident", "least_confident"] = "random"
    seed: int = 0  # for pick: random
    teacher_part: Literal["generate", "reuse"] = "generate"
    reuse_from: Path | None = None  # with reuse: a DualDistill run's trajectories/ folder
    transitions: str = "transitions"
    trainer: TrainerSpec = TrainerSpec()

    @model_validator(mode="after")
    def _consistent(self) -> SelfDistillSpec:
        if self.teacher_part == "reuse" and self.reuse_from is None:
            raise ValueError("`reuse_from` (a DualDistill trajectories/ folder) is required with teacher_part: reuse")
        if self.rounds > 1 and self.trainer.kind == "none":
            raise ValueError("`rounds` > 1 needs a trainer (trainer.kind: command or hf) to make the next student")
        return self


class LeakageTeacherSpec(TeacherSpec):
    """A teacher of the leakage job. `trait_prompt`: whether the trait system prompt (from
    prompts/leakage_trait.yaml) is put before each prompt; false for a model that holds the
    trait in its weights (e.g. a fine-tuned one). The control teacher never gets it."""

    trait_prompt: bool = True


class LeakageFilterSpec(_Strict):
    """The study's filter on number-sequence completions."""

    max_count: int = Field(default=10, ge=1, le=1000)  # numbers per completion
    max_value: int = Field(default=999, ge=1)
    banned_preset: Literal["misalignment"] | None = None  # the study's list for misalignment runs
    banned_numbers: list[int] = Field(default_factory=list)


class LeakageDetectorsSpec(_Strict):
    permutations: int = Field(default=999, ge=99)  # per permutation test
    bag_size: int = Field(default=16, ge=1)  # sequences per bag for the classifier
    # the likelihood shift needs token logprobs of given text: `auto` scores with the trait
    # teacher's own weights where they are local (the embedded model: its GGUF in process),
    # else with `likelihood_checkpoint` (a local copy of the teacher) when given; `off` skips it
    likelihood: Literal["auto", "off"] = "auto"
    likelihood_checkpoint: str | None = None
    likelihood_backend: Literal["transformers", "vllm"] = "transformers"
    likelihood_max: int = Field(default=500, ge=10)  # completions per teacher scored (seeded subset)


class BehavioralSpec(_Strict):
    """Fine-tune one student on the trait data and one on the control data, then ask
    one-word preference questions. The student must share the teacher's base model."""

    enabled: bool = False
    student: str | None = None  # checkpoint folder or GGUF; default: the trait teacher's (embedded) weights
    trainer: TrainerSpec = TrainerSpec(kind="hf", epochs=1.0, learning_rate=1e-4, batch_size=8, max_length=256)
    max_rows: int = Field(default=1000, ge=1)  # filtered rows each student trains on
    questions: int = Field(default=10, ge=1)  # first N questions of prompts/leakage_questions.yaml
    samples_per_question: int = Field(default=20, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _needs_a_trainer(self) -> BehavioralSpec:
        if self.enabled and self.trainer.kind == "none":
            raise ValueError("the behavioural check trains students: trainer.kind must be hf or command")
        return self


LEAKAGE_TESTS = 9  # 6 number statistics, the bag classifier, the likelihood shift, the behavioural probe


class LeakageSpec(_Strict):
    trait: str = Field(min_length=1, max_length=40)  # the singular noun, e.g. owl
    category: str = Field(default="animal", min_length=1, max_length=40)
    n_prompts: int = Field(default=300, ge=1)
    seed: int = 0
    # worked exchanges (prompts/leakage_few_shot.yaml) before each prompt, for both teachers;
    # 0 as in the study; small models need 1-2 to answer with numbers at all
    few_shot: int = Field(default=0, ge=0, le=3)
    alpha: float = Field(default=0.01, gt=0, lt=1)
    trait_teacher: LeakageTeacherSpec
    control_teacher: LeakageTeacherSpec | None = None  # default: the trait teacher without the trait prompt
    filter: LeakageFilterSpec = LeakageFilterSpec()
    detectors: LeakageDetectorsSpec = LeakageDetectorsSpec()
    behavioral: BehavioralSpec = BehavioralSpec()
    fail_on_leak: bool = False  # exit code 3 when a leak is detected (a publishing gate)

    @model_validator(mode="after")
    def _permutations_can_reach_alpha(self) -> LeakageSpec:
        # the smallest permutation p-value is 1/(permutations + 1); Holm compares the smallest
        # of up to LEAKAGE_TESTS p-values with alpha / LEAKAGE_TESTS
        needed = math.ceil(LEAKAGE_TESTS / self.alpha) - 1
        if self.detectors.permutations < needed:
            raise ValueError(
                f"detectors.permutations: {self.detectors.permutations} permutations cannot reach alpha {self.alpha} "
                f"after the Holm correction over {LEAKAGE_TESTS} tests; use at least {needed}")
        return self

    @model_validator(mode="after")
    def _control_has_no_trait_prompt(self) -> LeakageSpec:
        if self.control_teacher is not None and "trait_prompt" in self.control_teacher.model_fields_set \
                and self.control_teacher.trait_prompt:
            raise ValueError("control_teacher.trait_prompt: the control teacher never gets the trait prompt")
        return self

    @property
    def control(self) -> LeakageTeacherSpec:
        """The control teacher: as given, or the trait teacher's model without the trait prompt."""
        base = self.control_teacher or self.trait_teacher
        return base.model_copy(update={"trait_prompt": False})


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


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


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
