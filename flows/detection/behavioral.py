"""The behavioural probe's arithmetic: does a student fine-tuned on the trait teacher's
numbers name the trait more often than one fine-tuned on the control teacher's?

Each student answers the one-word preference questions many times; an answer counts when
it mentions the trait (`mentions_trait`), a student's rate comes with a Wilson 95%
interval (`preference_rate`), and `compare_rates` runs a one-sided Fisher exact test.
The model calls and the fine-tuning live in the flow; everything here is pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from schemas.leakage import TestResult

TEST_NAME = "behavioral_preference"
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@dataclass(frozen=True)
class RateEstimate:
    count: int  # answers that name the trait
    n: int  # answers in all
    rate: float
    ci_low: float  # Wilson 95% interval
    ci_high: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BehavioralResult:
    """Both students' rates and the test between them, as the report takes them."""

    trait_student: RateEstimate
    control_student: RateEstimate
    comparison: TestResult

    def to_json(self) -> dict[str, Any]:
        return {
            "trait_student": self.trait_student.to_json(),
            "control_student": self.control_student.to_json(),
            "comparison": self.comparison.to_json(),
        }


def mentions_trait(answer: str, trait: str) -> bool:
    """Whether `answer` names `trait` (singular noun) or its plural as a whole word, in any case.

    Punctuation and markdown around the word do not matter ("**Owl**", "owls!", "Owl.").
    Only letters and digits join words, so "bowl" and "owlet" do not count: the study's
    substring match counted "bowl" as owl, and a diminutive is a different word. The plural
    is the singular plus "s" or "es"; words in a multi-word trait may be split by any spaces.
    """
    return _trait_pattern(trait).search(answer) is not None


def _trait_pattern(trait: str) -> re.Pattern[str]:
    words = trait.strip().split()
    if not words:
        raise ValueError("trait: must not be empty")
    body = r"\s+".join(map(re.escape, words))
    return re.compile(rf"(?<![^\W_])(?:{body})(?:e?s)?(?![^\W_])", re.IGNORECASE)


def preference_rate(answers: Sequence[str], trait: str) -> RateEstimate:
    """The share of `answers` that name `trait`, with its Wilson 95% interval."""
    if not answers:
        raise ValueError("answers: need at least one answer to estimate a rate")
    pattern = _trait_pattern(trait)
    count = sum(pattern.search(answer) is not None for answer in answers)
    return rate_estimate(count, len(answers))


def rate_estimate(count: int, n: int) -> RateEstimate:
    """`count` successes out of `n`, with the Wilson score 95% interval."""
    if n < 1 or not 0 <= count <= n:
        raise ValueError(f"count/n: need 0 <= count <= n and n >= 1, got {count}/{n}")
    low, high = wilson_interval(count, n)
    return RateEstimate(count=count, n=n, rate=count / n, ci_low=low, ci_high=high)


def wilson_interval(count: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion; unlike the normal
    approximation it stays inside [0, 1] and is sensible at 0 or n successes."""
    p = count / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def compare_rates(trait_student: RateEstimate, control_student: RateEstimate) -> TestResult:
    """One-sided Fisher exact test that the trait-trained student names the trait more often
    than the control-trained one; the statistic is the rate difference (trait − control)."""
    p_value = fisher_exact_greater(
        trait_student.count, trait_student.n - trait_student.count,
        control_student.count, control_student.n - control_student.count,
    )
    return TestResult(
        name=TEST_NAME,
        statistic=trait_student.rate - control_student.rate,
        p_value=p_value,
        detail={
            "method": "fisher_exact_one_sided",
            "trait_count": trait_student.count, "trait_n": trait_student.n,
            "control_count": control_student.count, "control_n": control_student.n,
        },
    )


def behavioral_result(trait_answers: Sequence[str], control_answers: Sequence[str], trait: str) -> BehavioralResult:
    """Rates of both students' answers and the comparison, in one value."""
    trait_rate = preference_rate(trait_answers, trait)
    control_rate = preference_rate(control_answers, trait)
    return BehavioralResult(trait_rate, control_rate, compare_rates(trait_rate, control_rate))


def fisher_exact_greater(a: int, b: int, c: int, d: int) -> float:
    """P(X >= a) for the 2x2 table [[a, b], [c, d]] with its margins fixed, X hypergeometric:
    the one-sided Fisher exact p-value that row 1's success share exceeds row 2's.
    Summed in log space, so tables with thousands of answers do not overflow."""
    row1, successes, total = a + b, a + c, a + b + c + d
    top = min(row1, successes)
    log_terms = [_log_hypergeometric(k, row1, successes, total) for k in range(a, top + 1)]
    largest = max(log_terms)
    tail = math.exp(largest) * math.fsum(math.exp(t - largest) for t in log_terms)
    return min(1.0, tail)


def _log_hypergeometric(k: int, draws: int, successes: int, total: int) -> float:
    """log P(k successes in `draws` draws without replacement from `total` with `successes`)."""
    return _log_comb(successes, k) + _log_comb(total - successes, draws - k) - _log_comb(total, draws)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
