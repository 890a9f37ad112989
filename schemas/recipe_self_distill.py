"""The `self_distill:` section: samples per problem, the verification/correction rule,
rounds, and the trainer that makes the next round's student (`TrainerSpec`, also used by
the leakage job's behavioural check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from schemas.recipe_base import _Strict


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
