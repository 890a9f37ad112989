"""Self-distillation selection: which student samples become training examples.

Input: one row per graded student sample, columns `problem_id`, `sample` (0..K-1),
`correct`, `ran_code`, `text`, `confidence` (mean token log-probability, higher = surer;
may be null) and `lowest_window`. A null `correct` counts as wrong; `correct` may be bool
or 0/1. All per-problem work is polars frame work (group_by, joins, sorts).

Rules, with ḡ = n_correct / k the problem's mean score; both thresholds are strict:
- `paper` (Agentic-R1): ḡ > β1 → one correct sample, for a verification example;
  ḡ < β2 → one incorrect sample, for a correction example. Both may hold for one problem.
- `reference` (the DualDistill code): as `paper`, but verification also needs ḡ < β2
  (the code's `0 < acc < 0.9`), so a problem at or above β2 gives nothing.
With the recipe's β1 = 0, β2 = 0.9 and K = 10: 9/10 correct gives a verification under
`paper` (0.9 is not < 0.9, so no correction) and nothing under `reference`; 8/10 gives both.
A rule that holds for a problem with no candidate (e.g. β1 < 0 and no correct sample)
picks nothing.

Picks among a problem's candidates for one kind:
- `random`: the candidate with the smallest 64-bit FNV-1a + fmix64 hash of
  "seed|problem_id|kind|sample", so the choice depends only on (seed, problem_id, kind) and
  the candidate set: not on row order, other problems or the polars version.
- `most_confident` / `least_confident`: highest / lowest `confidence`; a null (or NaN)
  confidence ranks after every known one in both orders, so a known value is preferred;
  ties go to the lowest sample index.
Output (PICK_COLUMNS) carries the pick's `ran_code`, which names the verifying teacher, and is
sorted by problem_id, then kind ("correction" before "verification").
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

RULES = ("paper", "reference")
PICKS = ("random", "most_confident", "least_confident")
REQUIRED = ("problem_id", "sample", "correct", "ran_code", "text", "confidence")
PICK_COLUMNS = ("problem_id", "kind", "sample", "confidence", "ran_code", "k", "n_correct", "mean_score")

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _check(samples: pl.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in samples.columns]
    if missing:
        raise ValueError(f"graded samples lack column(s): {', '.join(missing)}")
    if samples.select(pl.any_horizontal(pl.col("problem_id", "sample").null_count() > 0)).item():
        raise ValueError("graded samples have a null problem_id or sample")
    if samples.select(pl.struct("problem_id", "sample").is_duplicated().any()).item():
        raise ValueError("graded samples repeat a (problem_id, sample) pair")


def problem_stats(samples: pl.DataFrame) -> pl.DataFrame:
    """One row per problem: problem_id, k, n_correct, mean_score, distinct, duplicates."""
    _check(samples)
    return (
        samples.group_by("problem_id")
        .agg(
            k=pl.len().cast(pl.Int64),
            n_correct=pl.col("correct").cast(pl.Boolean).fill_null(False).sum().cast(pl.Int64),
            distinct=pl.col("text").n_unique().cast(pl.Int64),
        )
        .with_columns(mean_score=pl.col("n_correct") / pl.col("k"), duplicates=pl.col("k") - pl.col("distinct"))
        .select("problem_id", "k", "n_correct", "mean_score", "distinct", "duplicates")
        .sort("problem_id")
    )


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over the output."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def stable_hash(strings: pl.Series) -> pl.Series:
    """A 64-bit hash of each (non-null) string, the same on every machine and library version."""
    arr = strings.to_arrow().cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if len(arr) else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(int(lengths.max(initial=0))):  # one vectorised step per byte position
            live = lengths > i
            h[live] = (h[live] ^ data[starts[live] + i]) * _FNV_PRIME
        return pl.Series(strings.name, _fmix64(h), dtype=pl.UInt64)


def _order(pick: str, seed: int) -> tuple[list[pl.Expr], list[bool]]:
    """Sort keys that put a group's chosen candidate first, with their descending flags."""
    if pick == "random":
        key = pl.concat_str(pl.lit(str(seed)), "problem_id", "kind", pl.col("sample").cast(pl.String), separator="|")
        return [key.map_batches(stable_hash, return_dtype=pl.UInt64), pl.col("sample")], [False, False]
    conf = pl.col("confidence").cast(pl.Float64).fill_nan(None)
    return [conf.is_null(), conf, pl.col("sample")], [False, pick == "most_confident", False]


def select(
    samples: pl.DataFrame,
    *,
    beta1: float = 0.0,
    beta2: float = 0.9,
    rule: str = "paper",
    pick: str = "random",
    seed: int = 0,
) -> pl.DataFrame:
    """The picked samples: one per (problem, kind) whose rule holds; columns PICK_COLUMNS."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, not {pick!r}")
    g = pl.col("mean_score")
    verify = (g > beta1) & (g < beta2) if rule == "reference" else g > beta1
    graded = (
        samples.select("problem_id", "sample", "correct", "ran_code", "confidence")
        .with_columns(pl.col("correct").cast(pl.Boolean).fill_null(False), pl.col("confidence").cast(pl.Float64))
        .join(problem_stats(samples).select("problem_id", "k", "n_correct", "mean_score"), on="problem_id")
    )
    candidates = pl.concat(
        [
            graded.filter(verify & pl.col("correct")).with_columns(kind=pl.lit("verification")),
            graded.filter((g < beta2) & ~pl.col("correct")).with_columns(kind=pl.lit("correction")),
        ]
    )
    keys, descending = _order(pick, seed)
    return (
        candidates.sort([pl.col("problem_id"), pl.col("kind"), *keys], descending=[False, False, *descending])
        .group_by("problem_id", "kind", maintain_order=True)
        .first()
        .select(PICK_COLUMNS)
    )


def round_stats(stats: pl.DataFrame) -> dict:
    """A round's summary from `problem_stats`; the ratios are None when there are no problems.

    pass_at_1 is the unbiased estimate mean(c/k), equal to mean_score; pass_at_k is the share
    of problems with a correct sample; distinct_share is distinct samples / samples.
    """
    problems, samples = stats.height, int(stats["k"].sum())
    return {
        "problems": problems,
        "samples": samples,
        "mean_score": stats["mean_score"].mean() if problems else None,
        "pass_at_1": stats["mean_score"].mean() if problems else None,
        "pass_at_k": float((stats["n_correct"] > 0).mean()) if problems else None,
        "distinct_share": int(stats["distinct"].sum()) / samples if samples else None,
        "problems_with_duplicates": int((stats["duplicates"] > 0).sum()),
    }
