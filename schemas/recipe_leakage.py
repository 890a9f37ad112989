"""The `leakage:` section: the trait and control teachers, the filter on number-sequence
completions, the detectors and the behavioural check (fine-tuned students asked
preference questions).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from schemas.recipe_base import _Strict
from schemas.recipe_self_distill import TrainerSpec
from schemas.recipe_teachers import TeacherSpec


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
