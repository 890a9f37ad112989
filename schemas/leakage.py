"""The records of the trait-leakage check that cross its stages: one statistical test's outcome
(`TestResult`, from the detectors in flows/detection/) and the verdict drawn from all of them
(`LeakageVerdict`, read by the report in flows/publishing/leakage_report.py). Not the grader's
`Verdict` (schemas/records.py), which says whether one answer is correct."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TestResult:
    """One detector's test. `p_value` is None exactly when the test was skipped, and then
    `skipped` says why (e.g. "the endpoint returns no prompt logprobs")."""

    __test__ = False  # not a pytest class

    name: str
    statistic: float | None = None
    p_value: float | None = None
    skipped: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # test-specific figures, JSON-ready

    @property
    def ran(self) -> bool:
        return self.p_value is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LeakageVerdict:
    """The combined evidence: `p_value` after the multiple-testing correction over the tests
    that ran, and whether it passes `alpha`."""

    p_value: float | None
    leak_detected: bool
    alpha: float
    correction: str  # e.g. "holm"
    tests: tuple[TestResult, ...]
