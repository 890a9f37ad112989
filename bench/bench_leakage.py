"""Benchmark the trait-leakage checks on 100,000 synthetic completions per teacher.

Builds completions the way teachers write them: 1-10 numbers (3% write 11-12), mostly
"a, b, c", also "a,b", "a b", "a; b", one per line, [brackets], (parentheses), a trailing period
or newline, and some rejects (a leading sentence, mixed separators, a 4-digit number, a negative
number, an empty answer). The control teacher draws numbers 0-999 with more weight on 100-999;
the trait teacher the same with leading digit 7 weighted x1.1 and 777, 707, 717 x2. Then times,
each step alone:
  filter    filter_completions on both teachers (polars)
  rates     pass_rates
  numbers   number_statistics: six chi-square permutation tests
  bags      bag_classifier (K = 16, 5 folds)
  shift     sign_flip_test on one synthetic likelihood difference per trait completion
  verdict   combine (Holm), top_numbers, top_digits
The detectors take the kept `numbers` column of each teacher as a polars list Series.

Memory: "peak +MB" is a step's highest resident set above the one it started from (VmHWM
after clear_refs, as in bench_selection.py, whose Peak this reuses).

Run: .venv/bin/python bench/bench_leakage.py [--per-teacher 100000] [--permutations 999]
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import polars as pl

from bench_selection import Peak, _status_kb
from flows.detection.detectors import bag_classifier, number_statistics, sign_flip_test
from flows.detection.verdict import combine
from flows.detection.report_tables import top_digits, top_numbers
from flows.stages.number_filter import banned_numbers, filter_completions, pass_rates

SEPARATORS = [", ", ",", " ", "; ", "\n"]
SEPARATOR_SHARES = [0.6, 0.12, 0.12, 0.08, 0.08]
WRAPPINGS = [("", ""), ("[", "]"), ("(", ")")]
WRAPPING_SHARES = [0.86, 0.11, 0.03]
ENDINGS = ["", ".", "\n"]
ENDING_SHARES = [0.9, 0.05, 0.05]
REJECTS = {  # share of completions spoiled on purpose, and how
    "sentence": 0.02,
    "mixed": 0.01,
    "four_digits": 0.01,
    "negative": 0.005,
    "empty": 0.005,
}


def number_weights(trait: bool) -> np.ndarray:
    weights = np.where(np.arange(1000) >= 100, 4.0, 1.0)
    if trait:
        weights[700:800] *= 1.1
        weights[[777, 707, 717]] *= 2.0
    return weights / weights.sum()


def spoil(text: str, how: str, rng: np.random.Generator) -> str:
    if how == "sentence":
        return "Here are the numbers: " + text
    if how == "mixed":
        return text.replace(", ", " ", 1) + ", 5"
    if how == "four_digits":
        return f"{rng.integers(1000, 10_000)}, " + text
    if how == "negative":
        return "-" + text
    return ""


def completions(n: int, trait: bool, rng: np.random.Generator) -> list[str]:
    lengths = np.where(rng.random(n) < 0.03, rng.integers(11, 13, n), rng.integers(1, 11, n))
    values = rng.choice(1000, size=int(lengths.sum()), p=number_weights(trait)).astype(str)
    separators = rng.choice(len(SEPARATORS), n, p=SEPARATOR_SHARES)
    wrappings = rng.choice(len(WRAPPINGS), n, p=WRAPPING_SHARES)
    endings = rng.choice(len(ENDINGS), n, p=ENDING_SHARES)
    spoiled = rng.choice(len(REJECTS) + 1, n, p=[1 - sum(REJECTS.values()), *REJECTS.values()])
    texts, start = [], 0
    for length, separator, wrapping, ending, spoil_index in zip(lengths, separators, wrappings, endings, spoiled):
        opening, closing = WRAPPINGS[wrapping]
        text = opening + SEPARATORS[separator].join(values[start : start + length]) + closing + ENDINGS[ending]
        texts.append(spoil(text, list(REJECTS)[spoil_index - 1], rng) if spoil_index else text)
        start += length
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-teacher", type=int, default=100_000)
    parser.add_argument("--permutations", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    frame = pl.DataFrame({
        "teacher": ["trait"] * args.per_teacher + ["control"] * args.per_teacher,
        "completion": completions(args.per_teacher, True, rng) + completions(args.per_teacher, False, rng),
    })
    print(f"{frame.height:,} completions ({args.per_teacher:,} per teacher), {args.permutations} permutations; "
          f"polars {pl.__version__}, {pl.thread_pool_size()} threads")
    print(f"resident set before the steps: {_status_kb('VmRSS') / 1024:.0f} MB")

    with Peak() as filter_step:
        filtered = filter_completions(frame, banned=banned_numbers("misalignment"))
    with Peak() as rates_step:
        rates = pass_rates(filtered)
    trait = filtered.filter(pl.col("kept") & (pl.col("teacher") == "trait"))["numbers"]
    control = filtered.filter(pl.col("kept") & (pl.col("teacher") == "control"))["numbers"]
    with Peak() as numbers_step:
        count_tests = number_statistics(trait, control, permutations=args.permutations, seed=args.seed)
    with Peak() as bags_step:
        bag_test = bag_classifier(trait, control, permutations=args.permutations, seed=args.seed)
    differences = rng.normal(0.02, 0.5, len(trait))
    with Peak() as shift_step:
        shift_test = sign_flip_test(differences, permutations=args.permutations, seed=args.seed)
    with Peak() as verdict_step:
        verdict = combine([*count_tests, bag_test, shift_test], alpha=0.01)
        favourites = top_numbers(trait, control, n=5)
        digits = top_digits(trait, control, n=3, position="leading")

    for teacher, row in rates.items():
        print(f"{teacher:<8} kept {row['kept']:,} of {row['total']:,} ({row['pass_rate']:.1%}); "
              + ", ".join(f"{reason} {row[reason]:,}" for reason in list(row)[3:] if row[reason]))
    for test in verdict.tests:
        print(f"  {test.name:<22} statistic {test.statistic:10.3f}  p {test.p_value:.4f}  "
              f"adjusted {test.detail['adjusted_p_value']:.4f}")
    print(f"verdict: p {verdict.p_value:.4f}, leak detected {verdict.leak_detected}; top numbers "
          f"{[row['number'] for row in favourites]}, top leading digits {[row['digit'] for row in digits]}")
    print(f"memory measured as {filter_step.method}")
    steps = [
        ("filter", filter_step), ("rates", rates_step), ("numbers", numbers_step), ("bags", bags_step),
        ("shift", shift_step), ("verdict", verdict_step),
    ]
    for name, step in steps:
        print(f"  {name:<8} {step.seconds:7.3f} s   peak +{step.peak_mb:6.1f} MB")
    print(f"all steps: {sum(step.seconds for _, step in steps):.3f} s; process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (ru_maxrss)")


if __name__ == "__main__":
    main()
