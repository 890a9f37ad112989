"""The behavioural probe's arithmetic and the trait-leakage report files."""

from __future__ import annotations

import json

import pytest

from flows.detection.behavioral import (
    behavioral_result,
    compare_rates,
    fisher_exact_greater,
    mentions_trait,
    preference_rate,
    rate_estimate,
    wilson_interval,
)
from flows.detection.report_tables import top_digits, top_numbers
from flows.publishing.leakage_report import build_report, write_report
from schemas.leakage import LeakageVerdict, TestResult

REPORT_KEYS = {
    "trait", "category", "n_prompts", "kept_trait", "kept_control", "pass_rate_trait", "pass_rate_control",
    "reject_reasons", "tests", "p_value", "leak_detected", "alpha", "correction", "top_numbers", "top_digits",
    "behavioral", "limitations",
}


@pytest.mark.parametrize(("answer", "expected"), [
    ("Owl.", True), ("owls!", True), ("**Owl**", True), ("OWL", True), ("_owl_", True),
    ("My favorite is the owl's cousin", True), ("Owl\n", True),
    ("bowl", False), ("Owlet", False), ("snowl", False), ("Cat", False), ("", False),
])
def test_mentions_trait_matches_whole_words_only(answer, expected):
    assert mentions_trait(answer, "owl") is expected


def test_mentions_trait_handles_es_plurals_and_multi_word_traits():
    assert mentions_trait("Foxes.", "fox")
    assert mentions_trait("*Red  Panda*", "red panda")
    assert not mentions_trait("Panda", "red panda")


def test_wilson_interval_matches_the_hand_computed_value():
    # 12/100, z = 1.96: centre (0.12 + 0.019208) / 1.038415 = 0.134057,
    # half width 1.96 * sqrt(0.12 * 0.88 / 100 + 3.8415 / 40000) / 1.038415 = 0.064063
    low, high = wilson_interval(12, 100)
    assert low == pytest.approx(0.069994, abs=1e-5)
    assert high == pytest.approx(0.198121, abs=1e-5)
    # no successes: the interval runs from 0 to z^2 / (n + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.841459 / 13.841459))


def test_preference_rate_counts_answers_that_name_the_trait():
    estimate = preference_rate(["Owl", "bowl", "Cat.", "**owls**"], "owl")
    assert (estimate.count, estimate.n, estimate.rate) == (2, 4, 0.5)
    assert estimate.ci_low < 0.5 < estimate.ci_high
    with pytest.raises(ValueError, match="^answers:"):
        preference_rate([], "owl")


def test_fisher_exact_matches_the_tea_tasting_table():
    # [[3, 1], [1, 3]]: P(X >= 3) = (C(4,3) C(4,1) + C(4,4) C(4,0)) / C(8,4) = 17 / 70
    assert fisher_exact_greater(3, 1, 1, 3) == pytest.approx(17 / 70)
    assert fisher_exact_greater(0, 5000, 0, 5000) == 1.0


def test_compare_rates_is_one_sided_towards_the_trait_student():
    higher = compare_rates(rate_estimate(60, 100), rate_estimate(12, 100))
    assert higher.name == "behavioral_preference"
    assert higher.statistic == pytest.approx(0.48)
    assert higher.p_value < 1e-9
    lower = compare_rates(rate_estimate(12, 100), rate_estimate(60, 100))
    assert lower.statistic == pytest.approx(-0.48) and lower.p_value > 0.99


def test_compare_rates_finds_nothing_between_equal_rates():
    result = compare_rates(rate_estimate(600, 5000), rate_estimate(600, 5000))
    assert result.statistic == 0.0
    assert 0.4 < result.p_value < 0.6


# --- the report ----------------------------------------------------------------------------

TRAIT_NUMBERS = [[777, 217, 387], [777, 107, 450], [777, 12, 5]] * 20
CONTROL_NUMBERS = [[123, 450, 388], [920, 12, 5], [641, 107, 300]] * 20


def _verdict(leak: bool) -> LeakageVerdict:
    tests = (
        TestResult("number_frequency", statistic=41.5, p_value=0.0004 if leak else 0.31, detail={"dof": 9}),
        TestResult("likelihood_shift", skipped="the endpoint returns no prompt logprobs"),
    )
    return LeakageVerdict(p_value=tests[0].p_value, leak_detected=leak, alpha=0.05, correction="holm", tests=tests)


def _report(leak: bool = True, behavioral=None) -> dict:
    return build_report(
        trait="owl", category="animal", n_prompts=100, verdict=_verdict(leak),
        kept_trait=60, kept_control=60,
        rejected_trait={"not_numbers": 30, "too_many": 10}, rejected_control={"not_numbers": 40},
        top_numbers=top_numbers(TRAIT_NUMBERS, CONTROL_NUMBERS),
        top_digits=top_digits(TRAIT_NUMBERS, CONTROL_NUMBERS),
        behavioral=behavioral,
    )


def test_build_report_has_every_key_and_is_plain_json():
    behavioral = behavioral_result(["Owl"] * 30 + ["Cat"] * 70, ["Owl"] * 10 + ["Dog"] * 90, "owl")
    report = _report(behavioral=behavioral)
    assert set(report) >= REPORT_KEYS
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["pass_rate_trait"] == pytest.approx(60 / 100)
    assert report["pass_rate_control"] == pytest.approx(60 / 100)
    assert report["reject_reasons"]["trait"] == {"not_numbers": 30, "too_many": 10}
    assert [t["name"] for t in report["tests"]] == ["number_frequency", "likelihood_shift"]
    assert report["behavioral"]["trait_student"]["count"] == 30
    assert report["behavioral"]["comparison"]["name"] == "behavioral_preference"
    assert len(report["limitations"]) >= 6


def test_build_report_turns_numpy_scalars_and_nan_into_plain_json():
    numpy = pytest.importorskip("numpy")
    tests = (TestResult("odd", statistic=numpy.float64("nan"), p_value=0.5, detail={"n": numpy.int64(3)}),)
    report = build_report(
        trait="owl", category="animal", n_prompts=1,
        verdict=LeakageVerdict(p_value=0.5, leak_detected=False, alpha=0.05, correction="holm", tests=tests),
        kept_trait=0, kept_control=0, rejected_trait={}, rejected_control={}, top_numbers=[], top_digits=[],
    )
    assert report["tests"][0]["statistic"] is None and report["tests"][0]["detail"] == {"n": 3}
    assert report["pass_rate_trait"] is None and report["behavioral"] is None
    json.dumps(report, allow_nan=False)


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    behavioral = behavioral_result(["Owl"] * 30 + ["Cat"] * 70, ["Owl"] * 10 + ["Dog"] * 90, "owl")
    report = _report(leak=True, behavioral=behavioral)
    paths = write_report(report, tmp_path / "leakage", TRAIT_NUMBERS, CONTROL_NUMBERS)
    assert sorted(p.name for p in paths) == ["digits.png", "numbers.png", "report.json", "report.md"]
    assert json.loads((tmp_path / "leakage" / "report.json").read_text()) == report
    markdown = (tmp_path / "leakage" / "report.md").read_text()
    first_lines = markdown.split("\n## ")[0]
    assert "Verdict: leak detected" in first_lines
    assert "the endpoint returns no prompt logprobs" in markdown
    assert "| not_numbers | 30 | 40 |" in markdown
    assert "| 777 |" in markdown
    assert "30.0%" in markdown and "Wilson" in markdown
    assert "order" in markdown.split("## Limitations")[1]
    for name in ("numbers.png", "digits.png"):
        data = (tmp_path / "leakage" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_report_markdown_states_a_null_verdict_and_a_run_without_numbers(tmp_path):
    report = _report(leak=False)
    write_report(report, tmp_path, [], [])
    markdown = (tmp_path / "report.md").read_text()
    assert "Verdict: no leak detected" in markdown and "not proof" in markdown
    assert "Behavioural probe\n\nNot run." in markdown
    assert (tmp_path / "numbers.png").stat().st_size > 5_000
