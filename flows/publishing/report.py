"""The run summary: case counts, accuracy per teacher, tokens, requests, time.

The same numbers feed the Prefect markdown artifact, the dataset cards, the
`summary.json` next to the datasets and the table the CLI prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from schemas.records import Composite, GradedTrajectory, Rejected

CASES = ("both_correct", "first_correct", "second_corrects", "both_wrong")


@dataclass
class TeacherSummary:
    model: str
    answers: int = 0
    correct: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    replayed_requests: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: int = 0  # answers cut off by max_tokens
    empty_answers: int = 0  # well-formed answers with nothing to grade (empty, blank, a bare refusal)
    wrong_by_reason: dict[str, int] = field(default_factory=dict)  # truncated, tool_limit, no_answer, not_equivalent…
    graded_by: dict[str, int] = field(default_factory=dict)  # grade_method -> answers
    disagree_with_math_verify: int = 0  # answers math-verify alone grades the other way

    @property
    def accuracy(self) -> float:
        return self.correct / self.answers if self.answers else 0.0


@dataclass
class RunSummary:
    run_name: str
    problems: int
    composites: int
    rejected: int
    cases: dict[str, int]
    teachers: dict[str, TeacherSummary]
    wall_s: float = 0.0
    sandbox: str = ""
    grader: str = ""
    datasets: dict[str, str] = field(default_factory=dict)  # name -> folder
    sent_this_run: dict[str, int] = field(default_factory=dict)  # requests that reached an endpoint now
    # answers replayed from the journal although they were asked with another max_tokens
    reused_across_budget: dict[str, int] = field(default_factory=dict)
    contaminated: dict[str, int] = field(default_factory=dict)  # benchmark -> problems set aside (`decontaminate:`)

    def to_dict(self) -> dict:
        data = asdict(self)
        for role, teacher in self.teachers.items():
            data["teachers"][role]["accuracy"] = round(teacher.accuracy, 4)
        return data


def summarise(
    run_name: str,
    problems: int,
    graded: Sequence[GradedTrajectory],
    composites: Sequence[Composite],
    rejected: Sequence[Rejected],
) -> RunSummary:
    cases = Counter({case: 0 for case in CASES})
    cases.update(c.case for c in composites)
    cases.update(r.case for r in rejected)
    teachers: dict[str, TeacherSummary] = {}
    for t in graded:
        s = teachers.setdefault(t.teacher, TeacherSummary(model=t.model))
        s.answers += 1
        s.correct += int(t.correct)
        s.prompt_tokens += t.prompt_tokens
        s.completion_tokens += t.completion_tokens
        s.requests += t.requests
        s.replayed_requests += t.replayed_requests
        s.tool_calls += t.tool_calls
        s.tool_errors += t.tool_errors
        s.truncated += int(t.finish_reason == "length")
        s.empty_answers += int(not t.correct and t.grade_reason.startswith("empty_answer"))
        s.graded_by[t.grade_method] = s.graded_by.get(t.grade_method, 0) + 1
        s.disagree_with_math_verify += int(t.math_verify_correct is not None and t.math_verify_correct != t.correct)
        if not t.correct:
            reason = t.grade_reason.split(":", 1)[0]
            s.wrong_by_reason[reason] = s.wrong_by_reason.get(reason, 0) + 1
    return RunSummary(run_name, problems, len(composites), len(rejected), dict(cases), teachers)


def combine(run_name: str, problems: int, parts: Sequence[RunSummary]) -> RunSummary:
    """One summary of a run from its shards' summaries (`summarise` of each), in shard order:
    the same figures as `summarise` of all their rows at once."""
    cases = Counter({case: 0 for case in CASES})
    teachers: dict[str, TeacherSummary] = {}
    for part in parts:
        cases.update(part.cases)
        for role, s in part.teachers.items():
            total = teachers.setdefault(role, TeacherSummary(model=s.model))
            for f in fields(TeacherSummary):
                mine, theirs = getattr(total, f.name), getattr(s, f.name)
                if isinstance(mine, int):
                    setattr(total, f.name, mine + theirs)
                elif isinstance(mine, dict):  # counts by reason or by method, in order of first appearance
                    for key, count in theirs.items():
                        mine[key] = mine.get(key, 0) + count
    return RunSummary(run_name, problems, sum(p.composites for p in parts), sum(p.rejected for p in parts),
                      dict(cases), teachers)


def cases_markdown(summary: RunSummary) -> str:
    rows = "\n".join(f"| `{case}` | {summary.cases.get(case, 0)} |" for case in CASES)
    return f"| case | pairs |\n|---|---|\n{rows}"


def teachers_markdown(summary: RunSummary) -> str:
    head = ("| teacher | model | answers | correct | accuracy | prompt tokens | completion tokens "
            "| requests (replayed) | code runs (errors) | cut by max_tokens | empty answers |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {role} | `{t.model}` | {t.answers} | {t.correct} | {t.accuracy:.1%} | {t.prompt_tokens} "
        f"| {t.completion_tokens} | {t.requests} ({t.replayed_requests}) | {t.tool_calls} ({t.tool_errors}) "
        f"| {t.truncated} | {t.empty_answers} |"
        for role, t in summary.teachers.items()
    ]
    return "\n".join([head, *rows])


def wrong_reasons_markdown(summary: RunSummary) -> str:
    """Why answers were graded wrong, per teacher (trace flags such as `truncated` included)."""
    reasons = sorted({r for t in summary.teachers.values() for r in t.wrong_by_reason})
    if not reasons:
        return "No answer was graded wrong."
    head = "| teacher | " + " | ".join(f"`{r}`" for r in reasons) + " |\n|---|" + "---|" * len(reasons)
    rows = [f"| {role} | " + " | ".join(str(t.wrong_by_reason.get(r, 0)) for r in reasons) + " |"
            for role, t in summary.teachers.items()]
    methods = "; ".join(
        f"{role}: " + ", ".join(f"{m} {n}" for m, n in sorted(t.graded_by.items())) for role, t in summary.teachers.items()
    )
    disagreements = ", ".join(f"{role} {t.disagree_with_math_verify}" for role, t in summary.teachers.items())
    return ("\n".join([head, *rows]) + f"\n\nDecided by (`grade_method`): {methods}.\n\n"
            f"Graded the other way by math-verify alone: {disagreements} (`math_verify_correct` in "
            "`trajectories/`; `distillery grade --audit` lists why).")


def contaminated_markdown(counts: dict[str, int]) -> str:
    """Problems set aside as copies of benchmark items, per benchmark (`contaminated/` lists them)."""
    rows = "\n".join(f"| {name} | {count} |" for name, count in counts.items())
    return ("Problems that copy a benchmark item were set aside before any model call and are listed, with the "
            f"item they match, in `contaminated/`.\n\n| benchmark | problems set aside |\n|---|---|\n{rows}")


def _sent(summary: RunSummary) -> str:
    return ", ".join(f"{role} {count}" for role, count in summary.sent_this_run.items()) or "none"


def _reused(summary: RunSummary) -> str:
    return ", ".join(f"{role} {count}" for role, count in summary.reused_across_budget.items()) or "none"


def summary_markdown(summary: RunSummary) -> str:
    datasets = "\n".join(f"- `{name}`: `{path}`" for name, path in summary.datasets.items())
    return (
        f"# DualDistill run `{summary.run_name}`\n\n"
        f"{summary.problems} problems → {summary.composites} composites, {summary.rejected} rejected pairs "
        f"in {summary.wall_s:.1f} s (sandbox: {summary.sandbox}; grader: {summary.grader}). "
        f"Requests sent by this run: {_sent(summary)}; answers reused across a max_tokens change: "
        f"{_reused(summary)}.\n\n"
        f"## Stitching cases\n\n{cases_markdown(summary)}\n\n"
        f"## Teachers\n\n{teachers_markdown(summary)}\n\n"
        f"## Wrong answers by reason\n\n{wrong_reasons_markdown(summary)}\n\n"
        + (f"## Decontamination\n\n{contaminated_markdown(summary.contaminated)}\n\n" if summary.contaminated else "")
        + (f"## Datasets\n\n{datasets}\n" if datasets else "")
    )
