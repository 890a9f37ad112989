"""Statistical trait-leakage detectors: are the trait teacher's kept number sequences
distributed differently from the control teacher's?

Every detector is a permutation (or sign-flip) test with p = (1 + #{null >= observed}) / (1 + B),
so under the null hypothesis (trait and control sequences exchangeable; for the likelihood
shift, differences symmetric about 0) a test rejects at level alpha with probability at most
alpha. With B permutations the smallest p is 1 / (B + 1); `combine` (verdict.py) multiplies the
smallest p by the number of tests that ran (Holm), so B = DEFAULT_PERMUTATIONS = 999 lets up to
10 tests reach alpha = 0.01. A test stays valid with fewer permutations; it only loses resolution.

What each test can and cannot show:
- `number_frequency` (chi-square between the two count vectors over every number seen):
  favourite or avoided numbers. Blind to order, and diluted when the shift is spread thinly
  over hundreds of numbers.
- `leading_digit`, `trailing_digit`, `digit_count`: the same on digit-level features, which
  pool many numbers, so a diffuse shift (e.g. towards 7xx) shows with less data. Blind to order.
- `sequence_length`: how many numbers each teacher writes per answer.
- `leading_digit_bigrams`: leading digits of consecutive numbers, the only order-aware count
  here; it sees first-order order effects on a coarse ten-letter alphabet, nothing longer.
- `bag_classifier`: a cross-validated linear model (naive-Bayes log-ratios of the histograms
  above, each family shrunk towards 0 by a James-Stein factor so that families carrying only
  noise drop out) over bags of K sequences; statistic: AUROC of held-out bags. It pools
  differences too weak to see per sequence (follow-up work: AUROC 0.57 / 0.70 / 0.81 at
  K = 1 / 8 / 16 on owl data), but sees only what those histograms see, in bulk.
- `sign_flip_test` (test name `likelihood_shift`): the trait prompt explains the completions
  better than the control prompt. It shows that *some* persona prompt left a mark, not which
  one, unless the control prompt is matched (e.g. another animal's).
A clean result is "no difference these tests can see", not "no leak": the study found much of
the transferred signal in the order of numbers within a sequence (shuffling within answers
weakened transfer), and prompted LLM classifiers missed it entirely.

Permutation units. Permuting single sequences B times costs O(numbers x B), seconds per test at
100,000 sequences per teacher. Instead each teacher's sequences are shuffled and cut into units
of m = ceil(n / max_units) sequences (m = 1 up to `max_units` sequences in all; fewer than m
per teacher are left out), and the teacher labels are permuted across units, so the trait
counts under all B permutations are one matrix product (B x units labels, units x features
counts). Units are random groups of equal size, hence exchangeable under the null: the test
stays exact, and with ~1,000 units per teacher its power is that of sequence-level
permutations for all practical purposes. The bag classifier permutes whole bags the same way
(completion labels shuffled in groups of K, rather than re-bagged after every shuffle). The
larger teacher is subsampled at random to at most MAX_CLASS_RATIO times the smaller, so that
the smaller keeps enough units. Permuted statistics equal to the observed one count as >=.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import polars as pl

from schemas.leakage import TestResult

DEFAULT_PERMUTATIONS = 999  # smallest p 0.001: Holm over up to 10 tests still reaches alpha 0.01
MAX_UNITS = 2000  # permutation units for the count tests (see the module docstring)
MAX_CLASS_RATIO = 20  # the larger teacher is subsampled to at most this many times the smaller
MAX_BAGS_PER_CLASS = 1000  # bag classifier: 16,000 sequences per teacher at K = 16
NUMBER_TESTS = (
    "number_frequency", "leading_digit", "trailing_digit", "digit_count", "sequence_length", "leading_digit_bigrams",
)
_SMOOTHING = 0.5  # pseudo-count per feature in the bag classifier's log-ratios
_TIE_TOLERANCE = 1e-9  # relative: a permuted statistic this close to the observed one counts as >=
_CHUNK_ELEMENTS = 4_000_000  # largest temporary array, in elements, of the batched steps

Sequences = Sequence[Sequence[int]] | pl.Series


@dataclass(frozen=True)
class _Pooled:
    """Both teachers' sequences, trait first: every number in order, and per sequence its
    length and teacher."""

    values: np.ndarray  # int64
    lengths: np.ndarray  # int64
    is_trait: np.ndarray  # bool

    @classmethod
    def of(cls, trait: Sequences, control: Sequences) -> _Pooled:
        trait_values, trait_lengths = flatten_sequences(trait)
        control_values, control_lengths = flatten_sequences(control)
        return cls(
            values=np.concatenate([trait_values, control_values]),
            lengths=np.concatenate([trait_lengths, control_lengths]),
            is_trait=np.repeat([True, False], [len(trait_lengths), len(control_lengths)]),
        )

    @property
    def counts(self) -> tuple[int, int]:
        n_trait = int(self.is_trait.sum())
        return n_trait, len(self.is_trait) - n_trait


def flatten_sequences(sequences: Sequences) -> tuple[np.ndarray, np.ndarray]:
    """(all numbers in order, numbers per sequence); null sequences (rejected completions) are
    skipped, and a polars list column takes a fast path."""
    if isinstance(sequences, pl.Series):
        sequences = sequences.drop_nulls()
        lengths = sequences.list.len().to_numpy().astype(np.int64)
        values = sequences.explode().drop_nulls().to_numpy().astype(np.int64)
    else:
        sequences = [s for s in sequences if s is not None]
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        values = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    if values.size and values.min() < 0:
        raise ValueError("a sequence holds a negative number; the detectors expect filtered sequences")
    return values, lengths


def digit_features(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading digit, trailing digit and number of digits of each (non-negative) value."""
    n_digits = np.ones_like(values)
    for power in range(1, 19):
        n_digits += values >= 10**power
    return values // 10 ** (n_digits - 1), values % 10, n_digits


def _unit_histogram(unit: np.ndarray, key: np.ndarray, n_units: int, n_keys: int) -> np.ndarray:
    """units x keys counts; a unit of -1 (left out) is skipped."""
    used = unit >= 0
    flat = np.bincount(unit[used] * n_keys + key[used], minlength=n_units * n_keys)
    return flat.reshape(n_units, n_keys).astype(np.float64)


def _family_counts(data: _Pooled, unit_of_sequence: np.ndarray, n_units: int) -> dict[str, np.ndarray]:
    """Per feature family (NUMBER_TESTS), the units x features count matrix."""
    distinct, number_index = np.unique(data.values, return_inverse=True)
    leading, trailing, n_digits = digit_features(distinct)
    row = np.repeat(np.arange(len(data.lengths)), data.lengths)
    unit_of_value = unit_of_sequence[row]
    consecutive = row[:-1] == row[1:]
    bigram = leading[number_index[:-1][consecutive]] * 10 + leading[number_index[1:][consecutive]]
    longest_number, longest_sequence = int(n_digits.max(initial=1)), int(data.lengths.max(initial=0))
    return {
        "number_frequency": _unit_histogram(unit_of_value, number_index, n_units, len(distinct)),
        "leading_digit": _unit_histogram(unit_of_value, leading[number_index], n_units, 10),
        "trailing_digit": _unit_histogram(unit_of_value, trailing[number_index], n_units, 10),
        "digit_count": _unit_histogram(unit_of_value, n_digits[number_index] - 1, n_units, longest_number),
        "sequence_length": _unit_histogram(unit_of_sequence, data.lengths, n_units, longest_sequence + 1),
        "leading_digit_bigrams": _unit_histogram(unit_of_value[:-1][consecutive], bigram, n_units, 100),
    }


def _family_edges(families: dict[str, np.ndarray]) -> list[int]:
    """Column offsets of the families side by side: 0, then each family's end."""
    return np.cumsum([0] + [counts.shape[1] for counts in families.values()]).tolist()


@dataclass(frozen=True)
class _Units:
    """Each teacher's sequences in random order, cut into units of `size` sequences; units
    are numbered trait first."""

    of_sequence: np.ndarray  # unit index per sequence, -1 when left out
    per_class: tuple[int, int]  # trait units, control units
    size: int

    @property
    def count(self) -> int:
        return sum(self.per_class)

    @property
    def is_trait(self) -> np.ndarray:
        return np.repeat([True, False], self.per_class)

    @property
    def index_within_class(self) -> np.ndarray:
        return np.concatenate([np.arange(n) for n in self.per_class])

    def sequences_used(self) -> list[int]:
        return [n * self.size for n in self.per_class]


def _cut_units(is_trait: np.ndarray, size: int, max_per_class: int, rng: np.random.Generator) -> _Units:
    of_sequence = np.full(len(is_trait), -1, dtype=np.int64)
    per_class = []
    for label in (True, False):
        members = rng.permutation(np.flatnonzero(is_trait == label))
        n_units = min(len(members) // size, max_per_class)
        of_sequence[members[: n_units * size]] = sum(per_class) + np.arange(n_units * size) // size
        per_class.append(n_units)
    return _Units(of_sequence, (per_class[0], per_class[1]), size)


def _count_units(data: _Pooled, max_units: int, rng: np.random.Generator) -> _Units:
    """Units for the count tests: at most `max_units`, the larger teacher capped at
    MAX_CLASS_RATIO times the smaller."""
    n_trait, n_control = data.counts
    usable = [min(n, MAX_CLASS_RATIO * min(n_trait, n_control)) for n in (n_trait, n_control)]
    size = max(1, math.ceil(sum(usable) / max_units))
    return _cut_units(data.is_trait, size, max(usable) // size, rng)


def _permuted_rows(observed: np.ndarray, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0 is `observed`; rows 1..B are independent uniform permutations of it."""
    rows = np.tile(observed, (permutations + 1, 1))
    rows[1:] = rng.permuted(rows[1:], axis=1)
    return rows


def _permutation_p(observed: float, null: np.ndarray) -> float:
    at_least = np.count_nonzero(null >= observed - _TIE_TOLERANCE * max(abs(observed), 1.0))
    return float((1 + at_least) / (1 + len(null)))


def _chi_square(trait: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Pearson chi-square of 2 x K tables (trait row, totals - trait row) along the last axis,
    as G^2 / (n_trait n_control) (sum_k trait_k^2 / total_k - n_trait^2 / G) with G the grand
    total; features with a zero total add nothing."""
    grand = totals.sum(axis=-1)
    n_trait = trait.sum(axis=-1)
    n_both = n_trait * (grand - n_trait)
    zeros = np.zeros(np.broadcast(trait, totals).shape, dtype=trait.dtype)
    share_sum = np.divide(trait**2, totals, out=zeros, where=totals > 0).sum(axis=-1)
    centred = share_sum - np.divide(n_trait**2, grand, out=np.zeros_like(n_both), where=grand > 0)
    return np.divide(grand**2 * centred, n_both, out=np.zeros_like(n_both), where=n_both > 0)


def _total_variation(trait: np.ndarray, control: np.ndarray) -> float:
    return 0.5 * float(np.abs(trait / max(trait.sum(), 1) - control / max(control.sum(), 1)).sum())


def _skipped_number_tests(reason: str) -> list[TestResult]:
    return [TestResult(name=name, skipped=reason) for name in NUMBER_TESTS]


def number_statistics(
    trait: Sequences,
    control: Sequences,
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    max_units: int = MAX_UNITS,
) -> list[TestResult]:
    """One chi-square permutation test per feature family in NUMBER_TESTS order; the
    statistic is the chi-square, `detail` adds the total-variation distance."""
    data = _Pooled.of(trait, control)
    if min(data.counts) == 0:
        n_trait, n_control = data.counts
        return _skipped_number_tests(f"no kept sequences from one teacher (trait {n_trait}, control {n_control})")
    rng = np.random.default_rng(seed)
    units = _count_units(data, max_units, rng)
    labels = _permuted_rows(units.is_trait, permutations, rng).astype(np.float64)
    shared = {
        "permutations": permutations,
        "units": list(units.per_class),
        "unit_size": units.size,
        "sequences_used": units.sequences_used(),
    }
    families = _family_counts(data, units.of_sequence, units.count)
    trait_counts = np.split(labels @ np.hstack(list(families.values())), _family_edges(families)[1:-1], axis=1)
    results = []
    for (name, counts), permuted_trait_counts in zip(families.items(), trait_counts):
        totals = counts.sum(axis=0)
        if totals.sum() == 0:
            results.append(TestResult(name=name, skipped="nothing to count (every sequence has one number)"))
            continue
        statistics = _chi_square(permuted_trait_counts, totals)
        trait_row = counts[units.is_trait].sum(axis=0)
        detail = {
            **shared,
            "total_variation": _total_variation(trait_row, totals - trait_row),
            "bins": int((totals > 0).sum()),
            "null_mean": float(statistics[1:].mean()) if permutations else None,
        }
        results.append(TestResult(
            name=name,
            statistic=float(statistics[0]),
            p_value=_permutation_p(statistics[0], statistics[1:]),
            detail=detail,
        ))
    return results


def _normalised(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _shrinkage(counts: np.ndarray) -> np.ndarray:
    """Positive-part James-Stein factor (1 - df / chi-square, at least 0) of a family's 2 x K
    training tables (..., 2, folds, K): near 0 when the family's differences are what noise
    alone would give (hundreds of sparse per-number counts), near 1 when they stand out."""
    totals = counts.sum(axis=-3)
    chi_square = _chi_square(counts[..., 1, :, :], totals)
    df = (totals > 0).sum(axis=-1) - 1
    return np.clip(1 - np.divide(df, chi_square, out=np.full_like(chi_square, np.inf), where=chi_square > 0), 0, 1)


def _fold_weights(sums: np.ndarray, families: list[slice]) -> np.ndarray:
    """Naive-Bayes weights (rows, folds, features) from per-(label, fold) counts (rows, 2
    [control, trait], folds, features): for each held-out fold, fitted on the other folds, per
    family log p(feature | trait) - log p(feature | control), smoothed, times the family's
    shrinkage factor."""
    training = sums.sum(axis=2, keepdims=True) - sums
    log_counts = np.log(training + _SMOOTHING)
    weights = log_counts[:, 1] - log_counts[:, 0]
    for family in families:
        log_totals = np.log((training[..., family] + _SMOOTHING).sum(axis=-1))
        weights[..., family] -= (log_totals[:, 1] - log_totals[:, 0])[..., None]
        weights[..., family] *= _shrinkage(training[..., family])[..., None]
    return weights


def _aurocs(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row of `scores` (rows x items) against the same row of
    `positive`, ties counted half."""
    n_rows, n_items = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=1)
    # tied runs share the mean of their ordinal ranks
    starts_run = np.ones_like(ordered, dtype=bool)
    starts_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = np.cumsum(starts_run, axis=1) - 1 + n_items * np.arange(n_rows)[:, None]
    ordinal = np.broadcast_to(np.arange(1, n_items + 1, dtype=np.float64), ordered.shape)
    run_sizes = np.bincount(run.ravel(), minlength=n_rows * n_items)
    run_means = np.bincount(run.ravel(), weights=ordinal.ravel(), minlength=n_rows * n_items) / np.maximum(run_sizes, 1)
    ordered_positive = np.take_along_axis(positive, order, axis=1)
    rank_sums = (run_means[run] * ordered_positive).sum(axis=1)
    n_positive = ordered_positive.sum(axis=1)
    n_negative = n_items - n_positive
    return (rank_sums - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def _held_out_aurocs(counts: np.ndarray, families: list[slice], codes: np.ndarray, folds: int) -> np.ndarray:
    """AUROC of held-out bags for each row of `codes` (permutations x bags, code = label *
    folds + fold, label 1 = trait): per fold, naive-Bayes weights from the other folds' bags;
    a bag's score is its normalised histograms . those weights."""
    n_bags = codes.shape[1]
    n_codes = 2 * folds
    # rows per step: few large matrix products, at most ~_CHUNK_ELEMENTS floats per array
    chunk = max(1, _CHUNK_ELEMENTS // (counts.shape[1] * n_codes + n_bags * folds))
    counts32 = counts.astype(np.float32)  # sums stay exact: far below 2**24
    features = np.hstack([_normalised(counts[:, f]) for f in families]).astype(np.float32)
    bag = np.arange(n_bags)[None, :]
    aurocs = []
    for start in range(0, len(codes), chunk):
        block = codes[start : start + chunk]
        rows = np.arange(len(block))[:, None]
        membership = np.zeros((len(block) * n_codes, n_bags), dtype=np.float32)
        membership[rows * n_codes + block, bag] = 1
        sums = (membership @ counts32).reshape(len(block), 2, folds, -1)
        weights = _fold_weights(sums, families).reshape(len(block) * folds, -1)
        scores = (features @ weights.T).reshape(n_bags, len(block), folds)[bag, rows, block % folds]
        aurocs.append(_aurocs(scores, block >= folds))
    return np.concatenate(aurocs)


def bag_classifier(
    trait: Sequences,
    control: Sequences,
    *,
    bag_size: int = 16,
    folds: int = 5,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    max_bags: int = MAX_BAGS_PER_CLASS,
) -> TestResult:
    """Can a linear model tell trait bags of `bag_size` sequences from control bags? Features:
    each bag's normalised histograms of every NUMBER_TESTS family; model: naive-Bayes
    log-ratios fitted on the other folds, shrunk per family; statistic: AUROC of held-out bags
    (0.5 = chance). Bags are random groups within a teacher, at most `max_bags` per teacher,
    folds dealt in turn; permutations move whole bags, with their folds, between the teachers.
    Skipped when a teacher has fewer than 2 bags per fold."""
    data = _Pooled.of(trait, control)
    needed = 2 * folds
    if min(data.counts) // bag_size < needed:
        return TestResult(name="bag_classifier", skipped=(
            f"too few sequences for {needed} bags of {bag_size} per teacher (2 per fold, {folds} folds): "
            f"trait {data.counts[0]}, control {data.counts[1]}"
        ))
    rng = np.random.default_rng(seed)
    bags = _cut_units(data.is_trait, bag_size, max_bags, rng)
    family_counts = _family_counts(data, bags.of_sequence, bags.count)
    edges = _family_edges(family_counts)
    families = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    codes = bags.is_trait * folds + bags.index_within_class % folds
    codes = _permuted_rows(codes, permutations, rng)
    aurocs = _held_out_aurocs(np.hstack(list(family_counts.values())), families, codes, folds)
    return TestResult(
        name="bag_classifier",
        statistic=float(aurocs[0]),
        p_value=_permutation_p(aurocs[0], aurocs[1:]),
        detail={
            "auroc": float(aurocs[0]),
            "null_mean_auroc": float(aurocs[1:].mean()) if permutations else None,
            "bags": list(bags.per_class),
            "bag_size": bag_size,
            "folds": folds,
            "sequences_used": bags.sequences_used(),
            "permutations": permutations,
        },
    )


def _sign_flipped_means(differences: np.ndarray, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `differences` under independent uniform random sign flips."""
    n = len(differences)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, permutations, chunk):
        rows = min(chunk, permutations - start)
        random_bytes = rng.integers(0, 256, size=(rows, (n + 7) // 8), dtype=np.uint8)
        kept_sign = np.unpackbits(random_bytes, axis=1, count=n).astype(np.float64)
        means.append((2 * (kept_sign @ differences) - differences.sum()) / n)
    return np.concatenate(means) if means else np.empty(0)


def sign_flip_test(
    differences: Sequence[float] | np.ndarray, *, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0
) -> TestResult:
    """One-sided test that the mean likelihood shift (per completion, log p(completion |
    trait prompt) - log p(completion | control prompt), per token) is above 0. Non-finite
    differences are dropped and counted in `detail`."""
    values = np.asarray(differences, dtype=np.float64)
    finite = values[np.isfinite(values)]
    dropped = int(values.size - finite.size)
    if finite.size == 0:
        return TestResult(
            name="likelihood_shift", skipped="no finite likelihood differences", detail={"dropped": dropped}
        )
    observed = float(finite.mean())
    null = _sign_flipped_means(finite, permutations, np.random.default_rng(seed))
    return TestResult(
        name="likelihood_shift",
        statistic=observed,
        p_value=_permutation_p(observed, null),
        detail={"mean_shift": observed, "n": int(finite.size), "dropped": dropped, "permutations": permutations},
    )
