"""Publish a self-distillation round's three datasets with their cards."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
from flows.publishing.rounds import RoundSummary, rounds_markdown
from flows.publishing.spool import RowSpool
from flows.training.export import card_sections
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


ROUND_DATASETS = {"examples": SelfDistillExample, "samples": GradedTrajectory, "rejected": SelfDistillRejected}
TRAINABLE = ("examples", "samples")  # rows with `train_detail`: their card shows Axolotl and TRL set-ups


def round_spool(recipe: Recipe, round_number: int) -> RowSpool:
    """Where a round keeps its finished shards' rows until it publishes them."""
    return RowSpool(recipe.state_dir / "spool" / f"round-{round_number}", ROUND_DATASETS)


def publish_round(recipe: Recipe, summary: RoundSummary, spool: RowSpool) -> dict[str, str]:
    """`round-{r}/`, `round-{r}-samples/`, `round-{r}-rejected/` from the round's spooled rows,
    in shard order; returns name -> folder."""
    spec = recipe.self_distill
    settings = yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False).strip()
    sections = {
        "Round": rounds_markdown([summary]),
        "Student": f"`{summary.student}`, sampled with `{recipe.student.sampling.model_dump_json()}`",
        "Settings": f"```yaml\n{settings}\n```",
    }
    base = recipe.work_dir / "self_distill"
    folders = {"examples": base / f"round-{summary.round}", "samples": base / f"round-{summary.round}-samples",
               "rejected": base / f"round-{summary.round}-rejected"}
    published = {}
    for name, model in ROUND_DATASETS.items():
        card = DatasetCardInfo(
            title=f"{recipe.run_name} — self-distillation round {summary.round} {name}",
            description=DESCRIPTIONS[name],
            sections={**sections, **(card_sections(_shown(recipe, folders[name])) if name in TRAINABLE else {})},
            tags=["distillery", "self-distillation", "synthetic", "math"],
        )
        published[name] = str(publish_dataset(folders[name], spool.rows(name), features_for(model), card).path)
    return published


def _shown(recipe: Recipe, folder: Path) -> str:
    """A round's folder as the cards name it: under the recipe's `output_dir` as the user wrote it."""
    return f"{recipe.output_dir}/{folder.relative_to(recipe.work_dir).as_posix()}"
