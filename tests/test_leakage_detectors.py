"""Statistical leakage detectors: a biased fake trait teacher is flagged, an unbiased one
raises false alarms no more often than alpha allows, and the pieces (sign flip, bag classifier,
Holm, top numbers) do what they say."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from flows.detection.detectors import (
    NUMBER_TESTS,
    bag_classifier,
    number_statistics,
    sign_flip_test,
)
from flows.detection.verdict import combine, holm_adjusted
from flows.detection.report_tables import top_digits, top_numbers
from schemas.leakage import TestResult


def fake_teacher(rng: np.random.Generator, n: int, boost: float = 1.0) -> list[list[int]]:
    """n sequences of 1-10 numbers in 0..999; `boost` multiplies the weight of 700-799."""
    weights = np.ones(1000)
    weights[700:800] *= boost
    lengths = rng.integers(1, 11, n)
    values = rng.choice(1000, size=int(lengths.sum()), p=weights / weights.sum())
    return [chunk.tolist() for chunk in np.split(values, np.cumsum(lengths)[:-1])]


def binomial_upper(n: int, p: float, tail: float = 1e-3) -> int:
    """The smallest k with P(Binomial(n, p) > k) <= tail."""
    cumulative = 0.0
    for k in range(n + 1):
        cumulative += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if 1 - cumulative <= tail:
            return k
    return n


def all_detectors(trait, control, seed: int, permutations: int = 999) -> list[TestResult]:
    return [
        *number_statistics(trait, control, permutations=permutations, seed=seed),
        bag_classifier(trait, control, bag_size=4, folds=2, permutations=permutations, seed=seed),
    ]


def test_biased_teacher_is_flagged_at_alpha_001():
    flagged = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        trait, control = fake_teacher(rng, 150, boost=2.5), fake_teacher(rng, 150)
        verdict = combine(all_detectors(trait, control, seed), alpha=0.01)
        flagged += verdict.leak_detected
        assert {t.name for t in verdict.tests} == {*NUMBER_TESTS, "bag_classifier"}
    assert flagged == 5


def test_unbiased_teacher_false_alarms_stay_within_alpha():
    """Same generator for both teachers: the verdict at alpha 0.01, and each test alone at
    alpha 0.1 (Holm could hide a miscalibrated test), reject no more often than alpha allows."""
    seeds = 60
    false_alarms = 0
    rejections = dict.fromkeys([*NUMBER_TESTS, "bag_classifier"], 0)
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        tests = all_detectors(fake_teacher(rng, 40), fake_teacher(rng, 50), seed)
        false_alarms += combine(tests, alpha=0.01).leak_detected
        for test in tests:
            rejections[test.name] += test.p_value <= 0.1
    assert false_alarms <= binomial_upper(seeds, 0.01)
    assert all(count <= binomial_upper(seeds, 0.1) for count in rejections.values()), rejections
    assert sum(rejections.values()) > 0  # the p-values are not stuck at 1


def test_count_tests_with_grouped_units_still_detect_and_stay_calibrated():
    rng = np.random.default_rng(7)
    biased = number_statistics(fake_teacher(rng, 1000, boost=1.5), fake_teacher(rng, 1000), max_units=200)
    assert biased[0].detail["unit_size"] == 10
    assert biased[0].detail["units"] == [100, 100]
    assert min(t.p_value for t in biased) == pytest.approx(0.001)
    null_runs = [
        number_statistics(fake_teacher(rng, 205), fake_teacher(rng, 198), permutations=49, seed=seed, max_units=40)
        for seed in range(100)
    ]
    assert null_runs[0][0].detail["unit_size"] == 11
    for position, name in enumerate(NUMBER_TESTS):
        rejections = sum(tests[position].p_value <= 0.1 for tests in null_runs)
        assert rejections <= binomial_upper(100, 0.1), name


def test_polars_list_column_gives_the_same_result_as_python_lists():
    rng = np.random.default_rng(3)
    trait, control = fake_teacher(rng, 60, boost=2.0), fake_teacher(rng, 70)
    from_lists = number_statistics(trait, control, permutations=99, seed=1)
    from_series = number_statistics(pl.Series(trait), pl.Series(control), permutations=99, seed=1)
    assert from_lists == from_series


def test_number_statistics_skips_without_both_teachers_and_without_pairs():
    skipped = number_statistics([], [[1, 2]])
    assert [t.name for t in skipped] == list(NUMBER_TESTS)
    assert all(not t.ran and "no kept sequences" in t.skipped for t in skipped)
    singles = {t.name: t for t in number_statistics([[5]] * 20, [[6]] * 20, permutations=19)}
    assert not singles["leading_digit_bigrams"].ran
    assert singles["number_frequency"].ran
    with pytest.raises(ValueError, match="negative"):
        number_statistics([[-1]], [[1]])


def test_bag_classifier_pools_a_weak_per_sequence_bias():
    rng = np.random.default_rng(1)
    trait, control = fake_teacher(rng, 320, boost=2.0), fake_teacher(rng, 320)
    single = bag_classifier(trait, control, bag_size=1, permutations=199)
    bags = bag_classifier(trait, control, bag_size=16, permutations=199)
    assert bags.p_value <= 0.01
    assert bags.statistic > single.statistic + 0.15
    assert bags.detail["bags"] == [20, 20]
    assert bags.detail["sequences_used"] == [320, 320]
    assert 0.4 < bags.detail["null_mean_auroc"] < 0.6


def test_bag_classifier_skips_with_too_few_sequences():
    rng = np.random.default_rng(0)
    result = bag_classifier(fake_teacher(rng, 100), fake_teacher(rng, 200), bag_size=16, folds=5)
    assert not result.ran
    assert "too few sequences for 10 bags of 16" in result.skipped
    assert "trait 100, control 200" in result.skipped


def test_sign_flip_test_on_shifted_and_centred_differences():
    rng = np.random.default_rng(0)
    shifted = sign_flip_test(rng.normal(0.3, 1.0, 200), seed=1)
    assert shifted.p_value <= 0.01
    assert shifted.detail["n"] == 200
    assert shifted.detail["mean_shift"] == pytest.approx(shifted.statistic)
    assert sign_flip_test(rng.normal(-0.3, 1.0, 200)).p_value > 0.5  # one-sided
    null_p = [sign_flip_test(rng.normal(0.0, 1.0, 50), permutations=99, seed=s).p_value for s in range(200)]
    assert sum(p <= 0.1 for p in null_p) <= binomial_upper(200, 0.1)
    with_nan = sign_flip_test([0.5, float("nan"), 0.25, float("inf")], permutations=9)
    assert with_nan.detail["n"] == 2 and with_nan.detail["dropped"] == 2
    assert not sign_flip_test([float("nan")]).ran


def test_combine_applies_holm_over_the_tests_that_ran():
    tests = [
        TestResult("a", statistic=1.0, p_value=0.01),
        TestResult("b", statistic=1.0, p_value=0.04),
        TestResult("skipped", skipped="no logprobs"),
        TestResult("c", statistic=1.0, p_value=0.03),
    ]
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    verdict = combine(tests, alpha=0.05)
    assert verdict.p_value == pytest.approx(0.03)
    assert verdict.leak_detected
    assert [t.name for t in verdict.tests] == ["a", "b", "skipped", "c"]
    assert [t.detail.get("adjusted_p_value") for t in verdict.tests] == pytest.approx([0.03, 0.06, None, 0.06])
    assert not combine(tests, alpha=0.01).leak_detected
    bonferroni = combine(tests, alpha=0.05, correction="bonferroni")
    assert bonferroni.tests[1].detail["adjusted_p_value"] == pytest.approx(0.12)
    assert holm_adjusted([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # capped by the running maximum
    assert holm_adjusted([0.9, 0.8]) == [1.0, 1.0]


def test_combine_with_no_test_run():
    verdict = combine([TestResult("x", skipped="no model")], alpha=0.01)
    assert verdict.p_value is None and not verdict.leak_detected
    assert verdict.tests[0].skipped == "no model"
    with pytest.raises(ValueError, match="correction"):
        combine([], alpha=0.01, correction="fdr")


def test_top_numbers_orders_by_over_representation():
    trait = [[7, 7, 7, 7, 7, 7, 77, 77, 77, 5]] * 20
    control = [[7, 77, 5, 5, 5, 5, 5, 5, 5, 5]] * 20 + [[3]] * 5
    top = top_numbers(trait, control, n=5)
    assert [row["number"] for row in top] == [7, 77]  # 5 and 3 are under-represented
    assert top[0]["trait_count"] == 120 and top[0]["control_count"] == 20
    assert top[0]["trait_rate"] == pytest.approx(0.6)
    assert top[0]["ratio"] == pytest.approx(0.6 / (20 / 205))
    only_in_trait = top_numbers([[1, 1, 2]], [[2, 2]])
    assert [row["number"] for row in only_in_trait] == [1]
    assert only_in_trait[0]["ratio"] is None  # never seen in control


def test_top_digits_by_position():
    trait, control = [[712, 745, 7]] * 10, [[112, 245, 3]] * 10
    assert top_digits(trait, control, n=1, position="leading")[0]["digit"] == 7
    assert [row["digit"] for row in top_digits(trait, control, position="any")] == [7]
    assert top_digits(trait, control, position="trailing")[0]["digit"] == 7
    with pytest.raises(ValueError, match="position"):
        top_digits(trait, control, position="middle")
