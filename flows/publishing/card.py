"""The dataset card: the README.md of a published dataset folder.

The card's YAML header carries what `datasets` and the Hub read (`configs` pointing at
`data/{split}-*`, `dataset_info` with features, sizes and row counts, a size category);
its body is the title, the description and the sections of a `DatasetCardInfo`.
`flows.publishing.parquet.publish_dataset` writes it next to the data files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets.info import DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

if TYPE_CHECKING:
    from flows.publishing.parquet import _WrittenFile

_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
]


@dataclass(frozen=True)
class DatasetCardInfo:
    """What the README says about the dataset, besides what is computed from the data."""

    title: str  # e.g. "demo — DualDistill composites"
    description: str  # one paragraph: what a row is
    sections: dict[str, str]  # section title -> markdown body, rendered in insertion order
    tags: list[str] = field(default_factory=list)


def write_card(
    path: Path,
    card: DatasetCardInfo,
    features: datasets.Features,
    written: list[_WrittenFile],
    split: str,
) -> None:
    """The card for the files `written` of `split` at `path` (the folder's README.md)."""
    num_rows = sum(w.rows for w in written)
    data = DatasetCardData(
        pretty_name=card.title,
        size_categories=[_size_category(num_rows)],
        tags=list(card.tags) or None,
    )
    configs = {"default": {"data_files": [{"split": split, "path": f"data/{split}-*"}]}}
    MetadataConfigs(configs).to_dataset_card_data(data)
    info = _dataset_info(features, written, split)
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    body = "\n\n".join(
        [f"# {card.title}", card.description.strip()]
        + [f"## {title}\n\n{text.strip()}" for title, text in card.sections.items()]
    )
    DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)


def _dataset_info(
    features: datasets.Features, written: list[_WrittenFile], split: str
) -> datasets.DatasetInfo:
    arrow_bytes = sum(w.arrow_bytes for w in written)
    num_rows = sum(w.rows for w in written)
    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=arrow_bytes, num_examples=num_rows))
    return datasets.DatasetInfo(
        features=features,
        splits=splits,
        download_size=sum(w.file_bytes for w in written),
        dataset_size=arrow_bytes,
    )


def _size_category(num_rows: int) -> str:
    for bound, label in _SIZE_CATEGORIES:
        if num_rows < bound:
            return label
    return "10B<n<100B"
