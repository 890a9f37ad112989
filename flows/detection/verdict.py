"""The verdict over a leakage check's tests: each test's p-value adjusted for the number of
tests that ran (Holm, or Bonferroni), and a leak detected when the smallest adjusted p is at most
alpha. The tests themselves are detectors.py, likelihood.py and behavioral.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from schemas.leakage import LeakageVerdict, TestResult


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted.tolist()


def bonferroni_adjusted(p_values: Sequence[float]) -> list[float]:
    return [min(1.0, len(p_values) * p) for p in p_values]


CORRECTIONS: dict[str, Callable[[Sequence[float]], list[float]]] = {
    "holm": holm_adjusted,
    "bonferroni": bonferroni_adjusted,
}


def combine(tests: Sequence[TestResult], alpha: float, correction: str = "holm") -> LeakageVerdict:
    """The verdict over the tests that ran: each gets `adjusted_p_value` in its detail, the
    verdict's p_value is the smallest adjusted p, and a leak is detected when it is <= alpha.
    Skipped tests are kept but not counted; with none run, p_value is None."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; known: {', '.join(CORRECTIONS)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ran = [i for i, t in enumerate(tests) if t.ran]
    if not ran:
        return LeakageVerdict(p_value=None, leak_detected=False, alpha=alpha, correction=correction, tests=tuple(tests))
    adjusted = dict(zip(ran, CORRECTIONS[correction]([tests[i].p_value for i in ran])))
    annotated = tuple(
        replace(t, detail={**t.detail, "adjusted_p_value": adjusted[i]}) if i in adjusted else t
        for i, t in enumerate(tests)
    )
    p_value = min(adjusted.values())
    return LeakageVerdict(p_value=p_value, leak_detected=p_value <= alpha, alpha=alpha, correction=correction,
                          tests=annotated)
