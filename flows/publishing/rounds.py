"""What a self-distillation run reports per round: the numbers, a markdown table, a PNG.

The same `RoundSummary` feeds the CLI table, the Prefect artifact, the dataset cards,
`self_distill/summary.json` and `self_distill/accuracy.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from schemas.records import GradedTrajectory, SelfDistillExample, SelfDistillRejected


@dataclass
class RoundSummary:
    round: int
    student: str  # the model sampled in this round
    problems: int
    samples: int
    mean_score: float  # mean over problems of (correct samples / K)
    pass_at_1: float
    pass_at_k: float  # share of problems with at least one correct sample
    distinct_share: float  # distinct completions / samples
    problems_with_duplicates: int
    examples: dict[str, int] = field(default_factory=dict)  # kind -> rows
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sent: int = 0  # requests that reached an endpoint in this run
    disagree_with_math_verify: int = 0  # samples math-verify alone grades the other way
    wall_s: float = 0.0
    next_student: str | None = None  # what the trainer made, when one ran
    datasets: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def duplicate_warning(self) -> str | None:
        if not self.problems_with_duplicates:
            return None
        return (f"{self.problems_with_duplicates} of {self.problems} problems got duplicate samples "
                f"({self.distinct_share:.0%} distinct): a very sure model repeats itself, but check that the "
                "backend honours per-sample seeds, or the mean score counts one answer K times")


@dataclass
class RowFigures:
    """What a round's summary needs of its rows, counted shard by shard and added up."""

    verification: int = 0
    correction: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    disagree_with_math_verify: int = 0

    @classmethod
    def of(cls, samples: Sequence[GradedTrajectory], examples: Sequence[SelfDistillExample],
           rejected: Sequence[SelfDistillRejected]) -> RowFigures:
        return cls(verification=sum(e.kind == "verification" for e in examples),
                   correction=sum(e.kind == "correction" for e in examples), rejected=len(rejected),
                   prompt_tokens=sum(s.prompt_tokens for s in samples),
                   completion_tokens=sum(s.completion_tokens for s in samples),
                   disagree_with_math_verify=sum(s.math_verify_correct is not None and s.math_verify_correct != s.correct
                                                 for s in samples))

    def __add__(self, other: RowFigures) -> RowFigures:
        return RowFigures(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def summarise_round(round_number: int, student: str, stats: dict, rows: RowFigures, sent: int) -> RoundSummary:
    """A round's numbers from its per-problem stats (`selection.round_stats`) and its rows' figures."""
    return RoundSummary(
        round=round_number, student=student, problems=stats["problems"], samples=stats["samples"],
        mean_score=stats["mean_score"] or 0.0, pass_at_1=stats["pass_at_1"] or 0.0,
        pass_at_k=stats["pass_at_k"] or 0.0, distinct_share=stats["distinct_share"] or 0.0,
        problems_with_duplicates=stats["problems_with_duplicates"],
        examples={"verification": rows.verification, "correction": rows.correction},
        rejected=rows.rejected, prompt_tokens=rows.prompt_tokens, completion_tokens=rows.completion_tokens, sent=sent,
        disagree_with_math_verify=rows.disagree_with_math_verify,
    )


def rounds_markdown(rounds: list[RoundSummary]) -> str:
    head = ("| round | student | problems | samples | mean score | pass@1 | pass@K | distinct | "
            "verification | correction | rejected | tokens in / out | time |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r.round} | `{r.student}` | {r.problems} | {r.samples} | {r.mean_score:.3f} | {r.pass_at_1:.1%} "
        f"| {r.pass_at_k:.1%} | {r.distinct_share:.0%} | {r.examples.get('verification', 0)} "
        f"| {r.examples.get('correction', 0)} | {r.rejected} | {r.prompt_tokens} / {r.completion_tokens} "
        f"| {r.wall_s:.1f} s |"
        for r in rounds
    ]
    warnings = [f"- round {r.round}: {w}" for r in rounds if (w := r.duplicate_warning)]
    audit = ", ".join(f"round {r.round} {r.disagree_with_math_verify}" for r in rounds)
    return ("\n".join([head, *rows]) + f"\n\nSamples graded the other way by math-verify alone: {audit} "
            "(`math_verify_correct` in the `round-N-samples/` datasets; `distillery grade --audit` lists why)."
            + ("\n\n**Duplicate samples**\n" + "\n".join(warnings) if warnings else ""))


def summary_markdown(run_name: str, rounds: list[RoundSummary]) -> str:
    datasets = "\n".join(f"- round {r.round} `{name}`: `{path}`" for r in rounds for name, path in r.datasets.items())
    return (f"# Self-distillation run `{run_name}`\n\n{rounds_markdown(rounds)}\n\n"
            + (f"## Datasets\n\n{datasets}\n" if datasets else ""))


def plot_accuracy(rounds: list[RoundSummary], path: Path) -> Path:
    """pass@1 and pass@K per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=120)
    numbers = [r.round for r in rounds]
    axes.plot(numbers, [r.pass_at_1 for r in rounds], marker="o", label="pass@1 (mean score)")
    axes.plot(numbers, [r.pass_at_k for r in rounds], marker="s", label="pass@K")
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.05)
    axes.set_xticks(numbers)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Student accuracy per round")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
