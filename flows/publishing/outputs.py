"""Publish a run's three datasets (composites, trajectories, rejected) with their cards."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import yaml

from flows.publishing.report import RunSummary, cases_markdown, teachers_markdown, wrong_reasons_markdown
from flows.publishing.spool import RowSpool
from schemas.recipe import Recipe
from schemas.records import Composite, GradedTrajectory, Rejected

if TYPE_CHECKING:
    from flows.publishing.parquet import PublishedDataset

DATASETS = {"composites": Composite, "trajectories": GradedTrajectory, "rejected": Rejected}

DESCRIPTIONS = {
    "composites": (
        "DualDistill composite trajectories: a tool-using and a reasoning teacher answered each problem, each "
        "answer was graded against the gold answer, and the pair was stitched by correctness. `text` is the SFT "
        "target, `messages` the conversation, whose assistant turn carries `train_detail`: the character spans "
        "to train on, in Axolotl's `message_field_training_detail` format (end offsets inclusive). Executor output, "
        "failed code blocks and a failed first attempt are not trained; `mask_until` is the length of that failed "
        "first attempt, for trainers that only mask a prefix."
    ),
    "trajectories": (
        "Every graded teacher answer of the run, with tokens, requests, code executions and latency; "
        "`grade_method` and `parse_status` say how the grade was decided, and `messages` makes each answer "
        "trainable alone (assistant `train_detail`: executor output and failed code blocks not trained)."
    ),
    "rejected": "Problems whose two answers were both wrong, kept with the grader's reasons; not training data.",
}


def _card_sections(recipe: Recipe, summary: RunSummary) -> dict[str, str]:
    recipe_yaml = yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False).strip()
    sampling = "\n".join(
        f"- **{role}**: `{getattr(recipe.teachers, role).sampling.model_dump_json()}`" for role in ("tool", "reasoning")
    )
    return {
        "Stitching cases": cases_markdown(summary),
        "Teachers": teachers_markdown(summary),
        "Wrong answers by reason": wrong_reasons_markdown(summary),
        "Sampling parameters": sampling,
        "Grader": f"`{summary.grader}`; sandbox for code: `{summary.sandbox}`.",
        "Recipe": f"```yaml\n{recipe_yaml}\n```",
    }


def preload_publishing() -> None:
    """Import the Parquet writer (and `datasets`, ~1 s) now. A flow calls this in a thread
    while its requests are under way, so that the import is not paid after the last answer."""
    import flows.publishing.parquet  # noqa: F401


def row_spool(recipe: Recipe) -> RowSpool:
    """Where a DualDistill run keeps its finished shards' rows until it publishes them."""
    return RowSpool(recipe.state_dir / "spool", DATASETS)


def publish_outputs(recipe: Recipe, summary: RunSummary, spool: RowSpool) -> dict[str, PublishedDataset]:
    """The three datasets from the run's spooled rows, in shard order, each with its card."""
    # here, not at the top: `datasets` takes ~0.9 s to import, which would delay a run's first request
    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset

    sections = _card_sections(recipe, summary)
    published = {}
    for name, model in DATASETS.items():
        card = DatasetCardInfo(
            title=f"{recipe.run_name} — {name}", description=DESCRIPTIONS[name], sections=sections,
            tags=["distillery", "dualdistill", "synthetic", "math"],
        )
        published[name] = publish_dataset(recipe.work_dir / name, spool.rows(name), features_for(model), card)
    return published
