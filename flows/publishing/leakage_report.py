"""The trait-leakage report: `report.json`, a person-readable `report.md` and two plots.

`build_report` gathers the run's figures (filter pass rates and reject reasons, the
detectors' verdict, the most over-represented numbers and digits, the behavioural probe)
into one JSON-ready dict, with the limitations of what such statistics can show.
`write_report` writes it out with `numbers.png` (number frequencies, trait vs control)
and `digits.png` (leading and trailing digits, trait vs control). The
over-represented lists come from `flows.detection.report_tables.top_numbers` / `top_digits`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from flows.detection.behavioral import BehavioralResult
from flows.detection.report_tables import top_numbers
from schemas.leakage import LeakageVerdict

Completions = Sequence[Sequence[int]]  # the numbers of each kept completion

LIMITATIONS: tuple[str, ...] = (
    "Per-number and per-digit counts ignore the order of the numbers within an answer.",
    "In the study, shuffling numbers within answers weakened transfer, so much of the signal "
    "lies in the order of the numbers, which frequency tests cannot see.",
    "Prompted LLM classifiers failed to detect the leak in the study; reading the data is no safeguard.",
    "A log-likelihood shift mostly shows that some persona prompt was present, not which one, "
    "unless the control teacher carries a different trait.",
    "A small model such as our embedded 135M one shows no behavioural transfer: there the probe "
    "exercises the plumbing, not the science.",
    "No detection is not proof of no leak: the tests only see the shifts they were built for, "
    "at the sample size of this run.",
)

FREQUENCY_BIN = 50  # width of the number-frequency histogram's bins
PLOTTED_TOP_NUMBERS = 15


def build_report(
    *,
    trait: str,
    category: str,
    n_prompts: int,
    verdict: LeakageVerdict,
    kept_trait: int,
    kept_control: int,
    rejected_trait: Mapping[str, int],
    rejected_control: Mapping[str, int],
    top_numbers: Sequence[Mapping[str, Any]],
    top_digits: Sequence[Mapping[str, Any]],
    behavioral: BehavioralResult | None = None,
) -> dict[str, Any]:
    """The content of report.json.

    kept_*: completions each teacher kept after the filter.
    rejected_*: filter reject reason -> completions rejected for it, per teacher; the pass
        rate is kept / (kept + rejected), None when the teacher produced nothing.
    top_numbers, top_digits: JSON-ready rows, as `top_numbers()` / `top_digits()` make them.
    behavioral: the probe's rates and test, or None when it did not run.
    """
    return _json_ready({
        "trait": trait,
        "category": category,
        "n_prompts": n_prompts,
        "kept_trait": kept_trait,
        "kept_control": kept_control,
        "pass_rate_trait": _pass_rate(kept_trait, rejected_trait),
        "pass_rate_control": _pass_rate(kept_control, rejected_control),
        "reject_reasons": {"trait": dict(rejected_trait), "control": dict(rejected_control)},
        "tests": [test.to_json() for test in verdict.tests],
        "p_value": verdict.p_value,
        "leak_detected": verdict.leak_detected,
        "alpha": verdict.alpha,
        "correction": verdict.correction,
        "top_numbers": [dict(row) for row in top_numbers],
        "top_digits": [dict(row) for row in top_digits],
        "behavioral": behavioral.to_json() if behavioral else None,
        "limitations": list(LIMITATIONS),
    })


def _pass_rate(kept: int, rejected: Mapping[str, int]) -> float | None:
    total = kept + sum(rejected.values())
    return kept / total if total else None


def _json_ready(value: Any) -> Any:
    """Plain JSON types: tuples become lists, numpy scalars Python numbers, NaN/inf None."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"report: {value!r} ({type(value).__name__}) is not JSON-ready")


# --- over-represented numbers and digits ---------------------------------------------------


def number_counts(completions: Completions) -> tuple[Counter[int], int]:
    """How often each number occurs over all completions, and how many numbers there are."""
    counts = Counter(number for numbers in completions for number in numbers)
    return counts, sum(counts.values())


def digit_counts(completions: Completions, position: str) -> Counter[int]:
    """How often each digit 0–9 leads (`position="leading"`) or ends ("trailing") a number."""
    if position not in ("leading", "trailing"):
        raise ValueError(f"position: expected 'leading' or 'trailing', got {position!r}")
    index = 0 if position == "leading" else -1
    return Counter(int(str(abs(number))[index]) for numbers in completions for number in numbers)


# --- writing --------------------------------------------------------------------------------


def write_report(report: Mapping[str, Any], out_dir: Path,
                 trait_numbers: Completions, control_numbers: Completions) -> list[Path]:
    """report.json, report.md, numbers.png and digits.png under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    markdown_path.write_text(report_markdown(report))
    return [
        json_path,
        markdown_path,
        plot_number_frequencies(trait_numbers, control_numbers, out_dir / "numbers.png"),
        plot_digits(trait_numbers, control_numbers, out_dir / "digits.png"),
    ]


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as a page: the verdict first, then the evidence, then the limitations."""
    sections = [
        f"# Trait-leakage check: {report['trait']} ({report['category']})",
        verdict_line(report),
        "## Tests\n\n" + _tests_table(report["tests"]),
        "## Filter\n\n" + _filter_tables(report),
        "## Over-represented in the trait teacher's numbers\n\n"
        + "Numbers:\n\n" + _rows_table(report["top_numbers"])
        + "\n\nLeading and trailing digits:\n\n" + _rows_table(report["top_digits"])
        + "\n\n![Number frequencies](numbers.png)\n\n![Leading and trailing digits](digits.png)",
        "## Behavioural probe\n\n" + _behavioral_section(report["behavioral"]),
        "## Limitations\n\n" + "\n".join(f"- {sentence}" for sentence in report["limitations"]),
    ]
    return "\n\n".join(sections) + "\n"


def verdict_line(report: Mapping[str, Any]) -> str:
    ran = [test for test in report["tests"] if test["p_value"] is not None]
    if not ran:
        return "**Verdict: no test ran**, so nothing can be said about a leak."
    evidence = (f"combined p = {_number(report['p_value'])} ({report['correction']} over {len(ran)} "
                f"test{'s' if len(ran) != 1 else ''}), alpha = {report['alpha']}")
    if report["leak_detected"]:
        return f"**Verdict: leak detected**: {evidence}."
    return f"**Verdict: no leak detected**: {evidence}. This is not proof that nothing leaks."


def _tests_table(tests: Sequence[Mapping[str, Any]]) -> str:
    if not tests:
        return "No tests."
    rows = [f"| {t['name']} | {_number(t['statistic'])} | {_number(t['p_value'])} "
            f"| {_number((t.get('detail') or {}).get('adjusted_p_value'))} | {t['skipped'] or ''} |"
            for t in tests]
    return "\n".join(["| test | statistic | p-value | adjusted p | skipped because |", "|---|---|---|---|---|",
                      *rows])


def _filter_tables(report: Mapping[str, Any]) -> str:
    n_prompts = report["n_prompts"]
    passes = "\n".join([
        f"{n_prompts} prompts, answered by both teachers.\n",
        "| teacher | kept | pass rate |", "|---|---|---|",
        f"| trait | {report['kept_trait']} | {_percent(report['pass_rate_trait'])} |",
        f"| control | {report['kept_control']} | {_percent(report['pass_rate_control'])} |",
    ])
    reasons = report["reject_reasons"]
    names = sorted(reasons["trait"].keys() | reasons["control"].keys())
    if not names:
        return passes + "\n\nNo completion was rejected."
    rows = [f"| {name} | {reasons['trait'].get(name, 0)} | {reasons['control'].get(name, 0)} |" for name in names]
    return passes + "\n\n" + "\n".join(["| reject reason | trait | control |", "|---|---|---|", *rows])


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "None."
    columns = list(rows[0])
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(_number(row.get(column)) for column in columns)} |" for row in rows]
    return "\n".join(lines)


def _behavioral_section(behavioral: Mapping[str, Any] | None) -> str:
    if behavioral is None:
        return "Not run."
    rows = [
        f"| {label} | {rate['count']} / {rate['n']} | {_percent(rate['rate'])} "
        f"| {_percent(rate['ci_low'])} – {_percent(rate['ci_high'])} |"
        for label, rate in (("trait-trained", behavioral["trait_student"]),
                            ("control-trained", behavioral["control_student"]))
    ]
    comparison = behavioral["comparison"]
    test = (f"One-sided test that the trait-trained student names the trait more often: "
            f"difference {_number(comparison['statistic'])}, p = {_number(comparison['p_value'])}.")
    table = ["| student | names the trait | rate | 95% interval (Wilson) |", "|---|---|---|---|", *rows]
    return "\n".join(table) + "\n\n" + test


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


# --- plots ----------------------------------------------------------------------------------


def plot_number_frequencies(trait_numbers: Completions, control_numbers: Completions, path: Path) -> Path:
    """Share of numbers per bin of FREQUENCY_BIN values, and the most over-represented
    numbers, trait vs control, as a PNG."""
    plt = _pyplot()
    figure, (binned, top) = plt.subplots(2, 1, figsize=(7, 6), dpi=120)
    trait_bins, control_bins = _binned_shares(trait_numbers), _binned_shares(control_numbers)
    size = max(len(trait_bins), len(control_bins))
    edges = [index * FREQUENCY_BIN for index in range(size + 1)]
    binned.stairs(_pad(trait_bins, size), edges, label="trait")
    binned.stairs(_pad(control_bins, size), edges, label="control")
    binned.set_xlabel(f"number (bins of {FREQUENCY_BIN})")
    binned.set_ylabel("share of numbers")
    binned.set_title("Number frequencies")
    binned.legend()
    binned.grid(alpha=0.3)
    if not size:
        _note_empty(binned)

    rows = top_numbers(trait_numbers, control_numbers, n=PLOTTED_TOP_NUMBERS)
    _grouped_bars(top, [str(row["number"]) for row in rows],
                  [row["trait_rate"] for row in rows], [row["control_rate"] for row in rows])
    top.set_title("Most over-represented numbers in the trait teacher's answers")
    top.set_ylabel("share of numbers")
    return _save(plt, figure, path)


def plot_digits(trait_numbers: Completions, control_numbers: Completions, path: Path) -> Path:
    """Leading- and trailing-digit distributions, trait vs control, as a PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120, sharey=True)
    for position, ax in zip(("leading", "trailing"), axes):
        trait_counts, control_counts = digit_counts(trait_numbers, position), digit_counts(control_numbers, position)
        _grouped_bars(ax, [str(digit) for digit in range(10)],
                      _digit_shares(trait_counts), _digit_shares(control_counts))
        ax.set_title(f"{position.capitalize()} digit")
        ax.set_xlabel("digit")
    axes[0].set_ylabel("share of numbers")
    return _save(plt, figure, path)


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def _binned_shares(completions: Completions) -> list[float]:
    counts, total = number_counts(completions)
    bins: Counter[int] = Counter()
    for number, count in counts.items():
        bins[max(number, 0) // FREQUENCY_BIN] += count
    size = max(bins, default=-1) + 1
    return [_share(bins[index], total) for index in range(size)]


def _digit_shares(counts: Counter[int]) -> list[float]:
    total = sum(counts.values())
    return [_share(counts[digit], total) for digit in range(10)]


def _pad(values: list[float], length: int) -> list[float]:
    return values + [0.0] * (length - len(values))


def _grouped_bars(ax: Any, labels: Sequence[str], trait: Iterable[float], control: Iterable[float]) -> None:
    positions = range(len(labels))
    width = 0.4
    ax.bar([p - width / 2 for p in positions], list(trait), width, label="trait")
    ax.bar([p + width / 2 for p in positions], list(control), width, label="control")
    ax.set_xticks(list(positions), list(labels))
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    if not labels:
        _note_empty(ax)


def _note_empty(ax: Any) -> None:
    ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
