"""The `decontaminate:` section: the benchmarks whose items must stay out of the data and
how a problem is matched against them (flows/inputs/decontamination.py does the matching).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from schemas.recipe_base import _Strict


class BenchmarkColumns(_Strict):
    """Which benchmark columns hold the problem text and (optionally) its id."""

    problem: str = "problem"
    answer: str | None = None  # accepted so a `problems.columns` mapping can be copied; never read
    id: str | None = None  # absent: an item is named by its row


class BenchmarkSpec(_Strict):
    """A benchmark whose items must stay out of the data, read like `problems:`."""

    source: str  # .jsonl, .parquet, a local HF dataset folder, or a hub dataset name (needs the network)
    name: str | None = None  # in the counts and `contaminated/` rows; default: the source's file name
    split: str = "test"  # split to read from a dataset folder or the hub
    columns: BenchmarkColumns = BenchmarkColumns()

    @property
    def label(self) -> str:
        return self.name or Path(self.source.rstrip("/")).stem or self.source


class DecontaminateSpec(_Strict):
    """Problems that copy a benchmark item are set aside before any model call, after
    `problems.limit` (flows/inputs/decontamination.py says how matching works)."""

    against: list[BenchmarkSpec] = Field(min_length=1)  # benchmarks; a problem counts for the first it matches
    ngram: int = Field(default=8, ge=0)  # a shared run of this many words (lowercased, no punctuation) flags; 0 = off
    fuzzy: float = Field(default=95, ge=0, le=100)  # rapidfuzz ratio of the whole texts at least this flags; 0 = off
    # an n-gram found in this many benchmark items or more is boilerplate ("express your answer as a
    # common fraction"), not a copy; 0 = every n-gram counts
    common: int = Field(default=5, ge=0)

    @model_validator(mode="after")
    def _names_unique(self) -> DecontaminateSpec:
        labels = [benchmark.label for benchmark in self.against]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"benchmark names must be unique; give `name:` to tell apart {', '.join(twice)}")
        return self
