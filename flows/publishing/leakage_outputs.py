"""Publish the leakage job's completions: every one, the kept ones and the rejected ones."""

from __future__ import annotations

import json

import polars as pl
import yaml

from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
from schemas.recipe import Recipe
from schemas.records import NumberCompletion

DESCRIPTIONS = {
    "numbers": "Every number-sequence completion of both teachers (`teacher`: trait | control), same prompts, "
               "with the filter's decision.",
    "filtered": "Completions kept by the study's filter, with their numbers in order (`numbers`): the data a "
                "student would be trained on.",
    "rejected": "Completions the filter rejected, each with its `reason`.",
}


def publish_completions(recipe: Recipe, filtered: pl.DataFrame) -> dict[str, str]:
    """`numbers/`, `filtered/`, `rejected/` under `output_dir/leakage/`; returns name -> folder."""
    spec = recipe.leakage
    settings = yaml.safe_dump(json.loads(spec.model_dump_json(exclude={"behavioral"})), sort_keys=False).strip()
    sections = {"Settings": f"```yaml\n{settings}\n```"}
    fields = list(NumberCompletion.model_fields)
    ordered = filtered.sort("teacher", "prompt_index", descending=[True, False]).select(fields)
    parts = {"numbers": ordered, "filtered": ordered.filter(pl.col("kept")),
             "rejected": ordered.filter(~pl.col("kept"))}
    published = {}
    for name, frame in parts.items():
        card = DatasetCardInfo(title=f"{recipe.run_name} — trait leakage ({spec.trait}) {name}",
                               description=DESCRIPTIONS[name], sections=sections,
                               tags=["distillery", "subliminal-learning", "synthetic", "numbers"])
        rows = frame.to_dicts()
        folder = recipe.work_dir / "leakage" / name
        published[name] = str(publish_dataset(folder, rows, features_for(NumberCompletion), card).path)
    return published
