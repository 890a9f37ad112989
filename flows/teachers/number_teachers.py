"""The leakage job's two teachers (trait, control), each ready to complete number prompts.

One place says, for the flow, for a shard on a Dask or Ray worker and for `plan`'s pilot,
what a teacher's completions depend on (the trait system prompt where the teacher gets it,
the sampling parameters, the few-shot turns: its shards' cache keys) and makes its
journaled client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flows.inputs.number_prompts import NumberPrompt, few_shot_turns, trait_system_prompt
from flows.models.budget import Budget, run_budget
from flows.models.client import ModelClient
from flows.models.embedded import EmbeddedServer
from flows.models.journal import RequestJournal
from flows.models.keys import content_key
from flows.teachers.runtime import journal_dir, model_client, model_name, sampling_params
from schemas.recipe import LeakageTeacherSpec, Recipe


TEACHERS = ("trait", "control")


@dataclass(frozen=True)
class NumberTeacher:
    """What a teacher's completions depend on; `client` makes its (journaled) client."""

    name: str  # "trait" or "control"
    spec: LeakageTeacherSpec
    system: str | None  # the trait system prompt, for a trait teacher that gets it
    params: dict[str, Any]
    few_shot: list[dict[str, str]]

    def client(self, journal: RequestJournal, servers: list[EmbeddedServer], budget: Budget | None = None
               ) -> ModelClient:
        """A client on `journal`; an embedded teacher's llama.cpp server is appended to
        `servers` (the caller stops them)."""
        return model_client(self.spec, journal, servers, budget)

    def shard_key(self, run_token: str, prompts: Sequence[NumberPrompt]) -> str:
        """What a shard's completions depend on: never the endpoint's URL or key."""
        return content_key(run_token, "numbers", model_name(self.spec), self.system, self.params, self.few_shot,
                           [p.text for p in prompts])


def number_teachers(recipe: Recipe) -> list[NumberTeacher]:
    """The trait teacher, then the control teacher."""
    spec = recipe.leakage
    few_shot = few_shot_turns(spec.few_shot)
    return [NumberTeacher(name=name, spec=role, params=sampling_params(role), few_shot=few_shot,
                          system=trait_system_prompt(spec.trait, spec.category) if role.trait_prompt else None)
            for name, role in zip(TEACHERS, (spec.trait_teacher, spec.control), strict=True)]


def leakage_budget(recipe: Recipe) -> Budget | None:
    """The run's budget, with what the journal already holds counted (None without caps)."""
    return run_budget(recipe.budget, journal_dir(recipe), [(t.name, t.spec) for t in number_teachers(recipe)])
