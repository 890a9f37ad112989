"""Self-distillation selection: the β rules at and around the thresholds, picks, distinct counts."""

from __future__ import annotations

import polars as pl
import pytest

from flows.stages.selection import PICK_COLUMNS, problem_stats, round_stats, select, stable_hash


def graded(problems: dict[str, list[bool]], confidence: dict[str, list] | None = None, texts: dict | None = None):
    """Graded samples: problem id -> correctness of samples 0..K-1 (texts distinct unless given)."""
    rows = []
    for pid, correct in problems.items():
        for i, ok in enumerate(correct):
            rows.append(
                {
                    "problem_id": pid,
                    "sample": i,
                    "correct": ok,
                    "ran_code": i % 2 == 1,
                    "text": (texts or {}).get(pid, [f"{pid}-{j}" for j in range(len(correct))])[i],
                    "confidence": (confidence or {}).get(pid, [None] * len(correct))[i],
                    "lowest_window": None,
                }
            )
    schema = {"problem_id": pl.String, "sample": pl.Int64, "correct": pl.Boolean, "ran_code": pl.Boolean,
              "text": pl.String, "confidence": pl.Float64, "lowest_window": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def score(n_correct: int, k: int) -> list[bool]:
    return [True] * n_correct + [False] * (k - n_correct)


def kinds(picks: pl.DataFrame) -> dict[str, list[str]]:
    return {pid: group["kind"].to_list() for (pid,), group in picks.group_by("problem_id", maintain_order=True)}


# -- rules at and around the thresholds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_correct", "k", "paper", "reference"),
    [
        (0, 10, ["correction"], ["correction"]),  # ḡ = 0 is not > β1 = 0
        (1, 10, ["correction", "verification"], ["correction", "verification"]),  # ḡ = 1/K
        (5, 10, ["correction", "verification"], ["correction", "verification"]),
        (8, 10, ["correction", "verification"], ["correction", "verification"]),  # 0.8 < 0.9
        (9, 10, ["verification"], []),  # ḡ = β2 exactly: not < 0.9
        (10, 10, ["verification"], []),  # all correct
        (0, 1, ["correction"], ["correction"]),  # K = 1
        (1, 1, ["verification"], []),
        (0, 16, ["correction"], ["correction"]),
        (1, 16, ["correction", "verification"], ["correction", "verification"]),
        (14, 16, ["correction", "verification"], ["correction", "verification"]),  # 0.875
        (15, 16, ["verification"], []),  # 0.9375
        (16, 16, ["verification"], []),
    ],
)
def test_rules_at_and_around_thresholds(n_correct, k, paper, reference):
    samples = graded({"p": score(n_correct, k)})
    assert kinds(select(samples, rule="paper")).get("p", []) == paper
    assert kinds(select(samples, rule="reference")).get("p", []) == reference


def test_picked_samples_have_the_right_correctness_and_stats():
    samples = graded({"a": score(3, 8), "b": score(0, 4), "c": score(4, 4)})
    picks = select(samples)
    assert picks.columns == list(PICK_COLUMNS)
    assert picks.select("problem_id", "kind").rows() == [
        ("a", "correction"), ("a", "verification"), ("b", "correction"), ("c", "verification"),
    ]
    correct = {(r["problem_id"], r["sample"]): r["correct"] for r in samples.iter_rows(named=True)}
    for row in picks.iter_rows(named=True):
        assert correct[(row["problem_id"], row["sample"])] == (row["kind"] == "verification")
    a = picks.filter(pl.col("problem_id") == "a").row(0, named=True)
    assert (a["k"], a["n_correct"], a["mean_score"]) == (8, 3, 3 / 8)


def test_thresholds_are_parameters_and_strict():
    samples = graded({"p": score(5, 10)})  # ḡ = 0.5
    assert kinds(select(samples, beta1=0.5, beta2=0.5)) == {}
    assert kinds(select(samples, beta1=0.49, beta2=0.51)) == {"p": ["correction", "verification"]}
    assert kinds(select(samples, beta1=0.4, beta2=0.5, rule="reference")) == {}
    # β1 < 0 makes the rule hold at ḡ = 0, but there is no correct sample to pick
    assert kinds(select(graded({"p": score(0, 4)}), beta1=-1)) == {"p": ["correction"]}


def test_output_order_is_problem_then_kind_whatever_the_input_order():
    samples = graded({"z": score(1, 4), "a": score(2, 4), "m": score(4, 4)})
    picks = select(samples.sample(fraction=1.0, shuffle=True, seed=3))
    assert picks.select("problem_id", "kind").rows() == [
        ("a", "correction"), ("a", "verification"), ("m", "verification"),
        ("z", "correction"), ("z", "verification"),
    ]


def test_correct_as_integers_and_null_counts_as_wrong():
    samples = graded({"p": score(2, 4)}).with_columns(
        correct=pl.Series([1, None, 0, 0], dtype=pl.Int64)
    )
    stats = problem_stats(samples)
    assert stats.row(0, named=True)["n_correct"] == 1
    picks = select(samples, pick="most_confident")
    assert picks.filter(pl.col("kind") == "verification")["sample"].to_list() == [0]
    assert picks.filter(pl.col("kind") == "correction")["sample"].to_list() == [1]  # null grade: wrong


# -- picks ---------------------------------------------------------------------------------------


def test_random_pick_is_deterministic_and_independent_of_row_order_and_other_problems():
    problems = {f"p{i}": [j % 3 == i % 3 for j in range(16)] for i in range(40)}
    samples = graded(problems)
    first = select(samples, pick="random", seed=7)
    assert first.equals(select(samples, pick="random", seed=7))
    for shuffle_seed in range(3):
        shuffled = samples.sample(fraction=1.0, shuffle=True, seed=shuffle_seed)
        assert first.equals(select(shuffled, pick="random", seed=7))
    alone = select(samples.filter(pl.col("problem_id") == "p5"), pick="random", seed=7)
    assert alone.equals(first.filter(pl.col("problem_id") == "p5"))
    other_seed = select(samples, pick="random", seed=8)
    assert other_seed.select("problem_id", "kind").equals(first.select("problem_id", "kind"))
    assert other_seed["sample"].to_list() != first["sample"].to_list()


def test_random_pick_spreads_over_candidates():
    samples = graded({f"p{i}": score(8, 16) for i in range(200)})
    picks = select(samples, pick="random", seed=0)
    verification = picks.filter(pl.col("kind") == "verification")["sample"]
    correction = picks.filter(pl.col("kind") == "correction")["sample"]
    assert verification.is_between(0, 7).all() and correction.is_between(8, 15).all()
    assert verification.n_unique() == 8 and correction.n_unique() == 8


def test_stable_hash_is_fnv1a_with_fmix64():
    def reference(s: str) -> int:
        mask = (1 << 64) - 1
        h = 0xCBF29CE484222325
        for byte in s.encode():
            h = ((h ^ byte) * 0x100000001B3) & mask
        for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
            h = ((h ^ (h >> 33)) * mult) & mask
        return h ^ (h >> 33)

    strings = ["", "a", "0|problem-1|verification|3", "énoncé ∑", "x" * 300]
    assert stable_hash(pl.Series(strings)).to_list() == [reference(s) for s in strings]
    sliced = pl.Series(["skip", *strings])[1:]  # an offset into the Arrow buffers
    assert stable_hash(sliced).to_list() == [reference(s) for s in strings]


def test_most_and_least_confident_with_ties_and_nulls():
    confidence = {"p": [None, -0.5, -0.2, -0.2, -3.0, None, -3.0, float("nan")]}
    samples = graded({"p": [True, True, True, True, True, False, False, False]}, confidence)
    most = select(samples, pick="most_confident")
    least = select(samples, pick="least_confident")
    assert most.select("kind", "sample").rows() == [("correction", 6), ("verification", 2)]  # tie -> lowest index
    assert least.select("kind", "sample").rows() == [("correction", 6), ("verification", 4)]
    assert most.filter(pl.col("kind") == "verification")["confidence"].to_list() == [-0.2]


def test_confidence_all_null_falls_back_to_lowest_sample():
    samples = graded({"p": score(2, 4)}).with_columns(confidence=pl.lit(None))
    for pick in ("most_confident", "least_confident"):
        picks = select(samples, pick=pick)
        assert picks.select("kind", "sample").rows() == [("correction", 2), ("verification", 0)]
        assert picks["confidence"].dtype == pl.Float64


# -- stats ---------------------------------------------------------------------------------------


def test_distinct_and_duplicates():
    texts = {"dup": ["same", "same", "other", "same"], "uniq": ["a", "b", "c", "d"], "one": ["x"] * 4}
    samples = graded({"dup": score(1, 4), "uniq": score(2, 4), "one": score(4, 4)}, texts=texts)
    stats = problem_stats(samples)
    assert stats.rows() == [
        ("dup", 4, 1, 0.25, 2, 2),
        ("one", 4, 4, 1.0, 1, 3),
        ("uniq", 4, 2, 0.5, 4, 0),
    ]
    summary = round_stats(stats)
    assert summary == {
        "problems": 3,
        "samples": 12,
        "mean_score": pytest.approx((0.25 + 1.0 + 0.5) / 3),
        "pass_at_1": pytest.approx((0.25 + 1.0 + 0.5) / 3),
        "pass_at_k": 1.0,
        "distinct_share": 7 / 12,
        "problems_with_duplicates": 2,
    }


def test_round_stats_pass_at_k_and_unequal_k():
    stats = problem_stats(graded({"a": score(0, 2), "b": score(1, 4), "c": score(0, 1)}))
    summary = round_stats(stats)
    assert summary["pass_at_k"] == pytest.approx(1 / 3)
    assert summary["mean_score"] == pytest.approx(0.25 / 3)  # mean over problems, not over samples
    assert summary["samples"] == 7


def test_empty_input():
    empty = graded({})
    stats = problem_stats(empty)
    assert stats.height == 0
    assert stats.columns == ["problem_id", "k", "n_correct", "mean_score", "distinct", "duplicates"]
    picks = select(empty)
    assert picks.height == 0 and picks.columns == list(PICK_COLUMNS)
    assert round_stats(stats) == {
        "problems": 0, "samples": 0, "mean_score": None, "pass_at_1": None, "pass_at_k": None,
        "distinct_share": None, "problems_with_duplicates": 0,
    }
    assert select(empty, pick="most_confident").height == 0


# -- errors --------------------------------------------------------------------------------------


def test_bad_arguments_and_input_are_named():
    samples = graded({"p": score(1, 2)})
    with pytest.raises(ValueError, match="rule"):
        select(samples, rule="strict")
    with pytest.raises(ValueError, match="pick"):
        select(samples, pick="best")
    with pytest.raises(ValueError, match="confidence"):
        problem_stats(samples.drop("confidence"))
    with pytest.raises(ValueError, match="repeat"):
        problem_stats(pl.concat([samples, samples]))
    with pytest.raises(ValueError, match="null"):
        problem_stats(samples.with_columns(sample=pl.lit(None, dtype=pl.Int64)))
