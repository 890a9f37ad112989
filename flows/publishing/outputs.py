"""Publish a run's three datasets (composites, trajectories, rejected) with their cards, and
with `decontaminate:` the problems it set aside (`contaminated/`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from flows.publishing.report import (
    RunSummary,
    cases_markdown,
    contaminated_markdown,
    teachers_markdown,
    wrong_reasons_markdown,
)
from flows.publishing.spool import RowSpool
from schemas.recipe import Recipe
from schemas.records import Composite, Contaminated, GradedTrajectory, Rejected

if TYPE_CHECKING:
    from flows.publishing.parquet import PublishedDataset

DATASETS = {"composites": Composite, "trajectories": GradedTrajectory, "rejected": Rejected}
TRAINABLE = ("composites", "trajectories")  # rows with `train_detail`: their card shows Axolotl and TRL set-ups

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
        "`grade_method` and `parse_status` say how the grade was decided, `math_verify_correct` is math-verify's "
        "verdict alone (where it differs, `distillery grade --audit` shows why), and `messages` makes each answer "
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
        **({"Decontamination": contaminated_markdown(summary.contaminated)} if summary.contaminated else {}),
        "Recipe": f"```yaml\n{recipe_yaml}\n```",
    }


def preload_publishing() -> None:
    """Import the Parquet writer (and `datasets`, ~1 s) now. A flow calls this in a thread
    while its requests are under way, so that the import is not paid after the last answer."""
    import flows.publishing.parquet  # noqa: F401


def row_spool(recipe: Recipe) -> RowSpool:
    """Where a DualDistill run keeps its finished shards' rows until it publishes them."""
    return RowSpool(recipe.state_dir / "spool", DATASETS)


def publish_outputs(recipe: Recipe, summary: RunSummary, spool: RowSpool,
                    contaminated: Sequence[Contaminated] = ()) -> dict[str, PublishedDataset]:
    """The three datasets from the run's spooled rows, in shard order, each with its card; with
    `decontaminate:`, `contaminated/` too (the problems set aside)."""
    # here, not at the top: `datasets` takes ~0.9 s to import, which would delay a run's first request
    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
    from flows.training.export import card_sections

    sections = _card_sections(recipe, summary)
    published = {}
    for name, model in DATASETS.items():
        training = card_sections(f"{recipe.output_dir}/{name}") if name in TRAINABLE else {}
        card = DatasetCardInfo(
            title=f"{recipe.run_name} — {name}", description=DESCRIPTIONS[name], sections={**sections, **training},
            tags=["distillery", "dualdistill", "synthetic", "math"],
        )
        published[name] = publish_dataset(recipe.work_dir / name, spool.rows(name), features_for(model), card)
    if recipe.decontaminate is not None:
        published["contaminated"] = publish_contaminated(recipe, recipe.work_dir / "contaminated", contaminated,
                                                         summary.contaminated)
    return published


CONTAMINATED_DESCRIPTION = (
    "Problems set aside before any model call because they copy a benchmark item (the recipe's `decontaminate:`): "
    "each with the benchmark, the item it matched (`benchmark_problem`, `benchmark_row`, `benchmark_id`), the "
    "`method` that flagged it (`ngram`: a shared run of words after normalisation; `fuzzy`: rapidfuzz ratio of the "
    "whole normalised texts), its `score` and what they share. Not training data."
)


def publish_contaminated(recipe: Recipe, folder: Path, rows: Sequence[Contaminated],
                         counts: dict[str, int]) -> PublishedDataset:
    """The problems a run set aside as benchmark copies, as a dataset with its card."""
    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset

    settings = yaml.safe_dump(json.loads(recipe.decontaminate.model_dump_json()), sort_keys=False).strip()
    card = DatasetCardInfo(
        title=f"{recipe.run_name} — contaminated", description=CONTAMINATED_DESCRIPTION,
        sections={"Problems set aside": contaminated_markdown(counts), "Settings": f"```yaml\n{settings}\n```"},
        tags=["distillery", "decontamination"],
    )
    return publish_dataset(folder, list(rows), features_for(Contaminated), card)
