"""Benchmark self-distillation selection and publishing on 100,000 graded samples.

Builds 6,250 problems x K = 16 samples: per-problem solve rates spread from 0 to 1, texts of
about 2 KB of random letters (every 10th problem has a backend that repeats some completions),
confidences with 2% nulls. Then times, each step alone:
  stats    problem_stats (per-problem k, n_correct, mean_score, distinct texts)
  select   select(..., pick) and round_stats
  result   the picks joined with their stats and texts (the round's rows before publishing)
  picks    that frame written to Parquet (zstd)
  samples  all graded samples written to Parquet (round-{r}-samples/)

Memory: the process's resident set, read from /proc/self/status. Before each step the peak
(VmHWM) is reset by writing 5 to /proc/self/clear_refs, so a step's "peak +MB" is its highest
resident set minus the resident set it started from: it covers polars' and Arrow's own
allocations, which tracemalloc does not see. Where clear_refs is not allowed the figure is the
ru_maxrss delta instead (an underestimate when an earlier step peaked higher).

Run: .venv/bin/python bench/bench_selection.py [--problems 6250] [--k 16] [--pick random]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from flows.stages.selection import PICKS, problem_stats, round_stats, select

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Peak:
    """Wall time and peak resident set of a block, above the resident set it started from."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss delta"

    def __enter__(self) -> Peak:
        self.rss0 = _status_kb("VmRSS")
        self.max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        if self.method.startswith("VmHWM"):
            self.peak_mb = (_status_kb("VmHWM") - self.rss0) / 1024
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self.peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.max0) / 1024


def random_texts(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """rows x length bytes of letters and spaces at about English frequencies (zstd packs it ~2x)."""
    counts = [43, 26, 19, 17, 16, 15, 14, 13, 13, 13, 9, 8, 6, 6, 5, 5, 5, 4, 4, 4, 3, 2, 2, 1, 1, 1, 1]  # sum 256
    table = np.repeat(np.frombuffer(b" etaoinshrdlcumwfgypbvkjxqz", np.uint8), counts)
    return table[rng.integers(0, 256, size=(rows, length), dtype=np.uint8)]


def graded_samples(problems: int, k: int, seed: int, text_bytes: int = 2000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = problems * k
    problem = np.repeat(np.arange(problems), k)
    sample = np.tile(np.arange(k), problems)
    rate = rng.beta(0.6, 0.6, problems)[problem]  # many problems near 0 or 1, some in between
    # every 10th problem: each sample repeats sample 0 or 1 with probability 1/2
    repeats = (problem % 10 == 0) & (rng.random(n) < 0.5)
    variant = np.where(repeats, sample % 2, sample)
    bodies = random_texts(rng, n, text_bytes)[problem * k + variant].reshape(-1)
    offsets = np.arange(0, n * text_bytes + 1, text_bytes, dtype=np.int64)
    body = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(bodies))
    return pl.DataFrame(
        {
            "problem_id": pl.Series(problem).cast(pl.String).str.zfill(6).str.replace(r"^", "prob-"),
            "sample": sample.astype(np.int64),
            "correct": rng.random(n) < rate,
            "ran_code": rng.random(n) < 0.4,
            "confidence": np.where(rng.random(n) < 0.02, np.nan, -rng.gamma(2.0, 0.15, n)),
            "lowest_window": -rng.gamma(4.0, 0.3, n),
            "body": pl.from_arrow(body),
            "answer": (problem * 7 + variant) % 1000,
        }
    ).select(
        "problem_id", "sample", "correct", "ran_code",
        pl.concat_str("body", pl.lit(" \\boxed{"), pl.col("answer").cast(pl.String), pl.lit("}")).alias("text"),
        pl.col("confidence").fill_nan(None), "lowest_window",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=6250)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--pick", choices=PICKS, default="random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    samples = graded_samples(args.problems, args.k, args.seed)
    text_mb = samples["text"].str.len_bytes().sum() / 2**20
    print(f"{samples.height:,} graded samples, {args.problems:,} problems x K={args.k}, texts {text_mb:.0f} MB; "
          f"polars {pl.__version__}, {pl.thread_pool_size()} threads")
    print(f"resident set before the steps: {_status_kb('VmRSS') / 1024:.0f} MB")
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        with Peak() as stats_step:
            stats = problem_stats(samples)
        with Peak() as select_step:
            picks = select(samples, beta1=0.0, beta2=0.9, rule="paper", pick=args.pick, seed=args.seed)
            summary = round_stats(stats)
        with Peak() as result_step:
            result = picks.join(
                samples.select("problem_id", "sample", pl.col("text").alias("student_text"), "lowest_window"),
                on=["problem_id", "sample"],
            ).with_columns(round=pl.lit(1), pick=pl.lit(args.pick))
        with Peak() as picks_step:
            result.write_parquet(Path(tmp) / "round-1.parquet", compression="zstd")
        with Peak() as samples_step:
            samples.write_parquet(Path(tmp) / "round-1-samples.parquet", compression="zstd")
        sizes = {p.name: p.stat().st_size / 2**20 for p in Path(tmp).iterdir()}
        timings = [
            ("stats", stats_step), ("select", select_step), ("result", result_step),
            ("picks", picks_step), ("samples", samples_step),
        ]
    counts = dict(picks.group_by("kind").len().iter_rows())
    print(f"picks: {counts.get('verification', 0):,} verification, {counts.get('correction', 0):,} correction; "
          f"pass@1 {summary['pass_at_1']:.3f}, pass@K {summary['pass_at_k']:.3f}, "
          f"distinct share {summary['distinct_share']:.3f}, "
          f"{summary['problems_with_duplicates']:,} problems with duplicates")
    print(f"parquet: picks {sizes['round-1.parquet']:.1f} MB, samples {sizes['round-1-samples.parquet']:.1f} MB")
    print(f"memory measured as {timings[0][1].method}")

    for name, step in timings:
        print(f"  {name:<8} {step.seconds:7.3f} s   peak +{step.peak_mb:6.1f} MB")
    selection = sum(step.seconds for name, step in timings[:3])
    print(f"selection (stats + select + result): {selection:.3f} s; with publishing: "
          f"{sum(step.seconds for _, step in timings):.3f} s; process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (ru_maxrss)")
    for pick in PICKS:  # a second, warm run of select for each pick
        t0 = time.perf_counter()
        select(samples, pick=pick, seed=args.seed)
        print(f"  select, pick={pick}: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
