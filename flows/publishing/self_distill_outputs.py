"""Publish a self-distillation round's three datasets with their cards."""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml

from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
from flows.publishing.rounds import RoundSummary, rounds_markdown
from schemas.recipe import Recipe
from schemas.records import GradedTrajectory, SelfDistillExample, SelfDistillRejected

DESCRIPTIONS = {
    "examples": (
        "Self-distillation examples: a student sample and a teacher part. `verification`: a correct sample, "
        "the verification phrase and a correct solution by the other strategy (the sample is trained). "
        "`correction`: an incorrect sample, the correction phrase and a correct teacher solution (the sample is "
        "not trained: `mask_until`). The assistant turn of `messages` carries `train_detail` (Axolotl's "
        "`message_field_training_detail`, end offsets inclusive); executor output is never trained."
    ),
    "samples": "Every graded student sample of the round (K per problem), with its confidence when logprobs came back.",
    "rejected": "Picked samples that gave no example, with the reason (e.g. the teacher's solution was wrong).",
}


def publish_round(
    recipe: Recipe,
    summary: RoundSummary,
    examples: Sequence[SelfDistillExample],
    samples: Sequence[GradedTrajectory],
    rejected: Sequence[SelfDistillRejected],
) -> dict[str, str]:
    """`round-{r}/`, `round-{r}-samples/`, `round-{r}-rejected/`; returns name -> folder."""
    spec = recipe.self_distill
    settings = yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False).strip()
    sections = {
        "Round": rounds_markdown([summary]),
        "Student": f"`{summary.student}`, sampled with `{recipe.student.sampling.model_dump_json()}`",
        "Settings": f"```yaml\n{settings}\n```",
    }
    base = recipe.work_dir / "self_distill"
    tables = {
        "examples": (base / f"round-{summary.round}", examples, SelfDistillExample),
        "samples": (base / f"round-{summary.round}-samples", samples, GradedTrajectory),
        "rejected": (base / f"round-{summary.round}-rejected", rejected, SelfDistillRejected),
    }
    published = {}
    for name, (folder, rows, model) in tables.items():
        card = DatasetCardInfo(
            title=f"{recipe.run_name} — self-distillation round {summary.round} {name}",
            description=DESCRIPTIONS[name], sections=sections,
            tags=["distillery", "self-distillation", "synthetic", "math"],
        )
        published[name] = str(publish_dataset(folder, rows, features_for(model), card).path)
    return published
