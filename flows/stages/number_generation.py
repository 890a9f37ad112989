"""Number-sequence completions from a teacher: one journaled request per prompt.

Both teachers get the same prompts (`draw_prompts`); the trait teacher's messages start with
the trait system prompt unless its trait lives in its weights (`trait_prompt: false`).
Requests go through the teacher's `ModelClient`, so a rerun answers every finished prompt
from the journal and sends only the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from flows.inputs.number_prompts import NumberPrompt
from flows.models.budget import BudgetReached
from flows.models.client import ModelClient, ModelRequestError
from flows.teachers.number_teachers import NumberTeacher

class GenerationFailed(RuntimeError):
    """Some prompts got no completion after the client's retries; what did come back is journaled."""

    def __init__(self, failed: Sequence[dict[str, Any]], total: int) -> None:
        self.total = total
        first = failed[0]
        super().__init__(
            f"{len(failed)} of {total} number prompts got no completion; first: {first['teacher']} teacher, "
            f"prompt {first['prompt_index']}: {first['error']}. The answers that came back are journaled: "
            "rerun to send only the missing ones."
        )
        self.failed = list(failed)

    def __reduce__(self):  # noqa: ANN204 - pickles (it crosses back from a Dask or Ray worker)
        return (type(self), (self.failed, self.total))


def prompt_messages(prompt: NumberPrompt, system: str | None,
                    few_shot: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *few_shot, {"role": "user", "content": prompt.text}]


async def complete_prompts(
    client: ModelClient,
    prompts: Sequence[NumberPrompt],
    *,
    teacher: str,
    system: str | None,
    params: dict[str, Any],
    shard: str,
    few_shot: Sequence[dict[str, str]] = (),
    on_done: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per prompt: teacher, prompt index and text, completion, finish reason, tokens.

    A request that fails for good (after the client's retries) fails the shard with
    `GenerationFailed`, but only once every other prompt of the shard has its answer
    journaled, so a rerun sends only the failed ones. `on_done` is called as each prompt
    gets its completion (progress reporting)."""

    async def one(prompt: NumberPrompt) -> dict[str, Any]:
        row: dict[str, Any] = {"teacher": teacher, "model": client.model, "prompt_index": prompt.index,
                               "prompt": prompt.text, "system_prompt": system, "completion": None,
                               "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "replayed": False,
                               "error": None}
        try:
            response = await client.chat(prompt_messages(prompt, system, few_shot), params, sample=0, shard=shard)
        except (ModelRequestError, BudgetReached) as exc:
            return {**row, "error": str(exc)}
        if on_done is not None:
            on_done()
        return {**row, "completion": response.content, "finish_reason": response.finish_reason,
                "prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens,
                "replayed": response.replayed}

    rows = list(await asyncio.gather(*(one(p) for p in prompts)))
    failed = [row for row in rows if row["error"]]
    if failed:
        raise GenerationFailed(failed, len(rows))
    return rows


async def complete_shard(teacher: NumberTeacher, client: ModelClient, prompts: Sequence[NumberPrompt], shard: str,
                         on_done: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """One shard of `teacher`'s completions: the leakage job's pipeline for a shard, wherever it runs."""
    return await complete_prompts(client, prompts, teacher=teacher.name, system=teacher.system, params=teacher.params,
                                  shard=shard, few_shot=teacher.few_shot, on_done=on_done)


def journaled_prompts(teacher: NumberTeacher, client: ModelClient, prompts: Sequence[NumberPrompt]) -> int:
    """How many of `prompts` `complete_shard` would answer from the journal."""
    return sum(client.journaled(prompt_messages(p, teacher.system, teacher.few_shot), teacher.params) for p in prompts)
