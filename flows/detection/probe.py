"""The behavioural probe's questions: a trained student is asked the one-word preference
questions of the recipe's category, each several times (flows/detection/behavioral.py scores
the answers; flows/stages/behavioral_probe.py trains the students and calls this).

Answers are journaled under a model name that carries the student's fingerprint, so a
retrained student is asked again and a kept one replays from the journal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from flows.inputs.number_prompts import preference_questions
from flows.models.journal import RequestJournal
from schemas.recipe import Recipe


async def ask(checkpoint: Path, fingerprint: str, recipe: Recipe, journal: RequestJournal, shard: str) -> list[str]:
    """Every answer of one student to the preference questions."""
    from flows.models.transformers_backend import TransformersClient

    spec = recipe.leakage.behavioral
    questions = preference_questions(recipe.leakage.category)[: spec.questions]
    client = TransformersClient(model=f"{checkpoint}@{fingerprint[:16]}", checkpoint=checkpoint, journal=journal)
    params = {"temperature": spec.temperature, "max_tokens": spec.max_tokens, "seed": recipe.leakage.seed}
    try:
        replies = await asyncio.gather(*(
            client.chat([{"role": "user", "content": q}], params, sample=i, shard=shard)
            for q in questions for i in range(spec.samples_per_question)
        ))
    finally:
        await client.aclose()
    return [reply.content for reply in replies]
