"""What the `distillery` commands print when a job ends: rich tables and lines.

In:  the dicts a flow returns (a DualDistill `RunSummary.to_dict()`, self-distillation's
     rounds, the leakage report), a grading audit, a plan.
Out: text on stdout, every table within `WIDTH` columns with its headers whole (a header
     wraps at its spaces, never mid-word); cells too long for their column wrap.

flows/cli.py calls these after the flow (or the grader, or the planner) has run; nothing
here runs a flow or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from flows.grading import Audit
    from flows.orchestration.plan import Plan

WIDTH = 100  # columns of every table and line printed here, on a terminal or piped


def results_console() -> Console:
    """The console the results go to: stdout, `WIDTH` columns wide."""
    return Console(width=WIDTH)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, wrap: Sequence[str] = (),
           compact: bool = False, **options: Any) -> Table:
    """`rows` under `headers`, at most `WIDTH` columns wide with every header word whole.

    Columns keep their natural width while the table fits. Otherwise, the widest first, and
    each step only when the one before is not enough: the columns not named in `wrap` wrap
    their header and cells at spaces; those named (free text: a model, a student) fold down
    to their header's longest word; then every column folds down to its header's longest
    word. (Rich alone would narrow a column below its header and cut the last one.)
    `compact` (for many columns): no outer border or vertical rules, one space between columns."""
    rows = [[str(cell) for cell in row] for row in rows]
    if compact:
        options = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "padding": (0, 0),
                   **options}
    chrome = len(headers) - 1 if compact else 3 * len(headers) + 1  # rules, edges, padding
    columns = [[Text(header)] + [Text.from_markup(row[i]) for row in rows] for i, header in enumerate(headers)]
    natural = [max(line.cell_len for text in texts for line in text.split()) for texts in columns]
    header_words = [_longest_word(texts[:1]) for texts in columns]
    words = [_longest_word(texts) for texts in columns]
    widths = natural
    for floors in ([natural[i] if header in wrap else words[i] for i, header in enumerate(headers)],
                   [header_words[i] if header in wrap else words[i] for i, header in enumerate(headers)],
                   header_words):
        widths = _shrink(widths, floors, sum(widths) + chrome - WIDTH)
    table = Table(**options)
    for header, width in zip(headers, widths, strict=True):
        table.add_column(header, width=width, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _longest_word(texts: list[Text]) -> int:
    return max((len(word) for text in texts for word in text.plain.split()), default=1)


def _shrink(widths: list[int], floors: list[int], excess: int) -> list[int]:
    """`widths` less `excess` columns in all, taken from the widest first, none below its floor."""
    widths = list(widths)
    while excess > 0 and (wider := [i for i, width in enumerate(widths) if width > floors[i]]):
        widest = max(wider, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths


def print_summary(summary: dict) -> None:
    """A DualDistill run: counts, pairs per case, one row per teacher, the datasets written."""
    out = results_console()
    out.print(f"\n[bold]run {summary['run_name']}[/]: {summary['problems']} problems → {summary['composites']} "
              f"composites, {summary['rejected']} rejected, in {summary['wall_s']:.1f} s")
    out.print(_table(("case", "pairs"), summary["cases"].items()))
    teachers = [
        (role, t["model"], f"{t['accuracy']:.1%} ({t['correct']}/{t['answers']})",
         f"{t['prompt_tokens']} / {t['completion_tokens']}", f"{t['requests']} ({t['replayed_requests']})",
         f"{t['tool_calls']} ({t['tool_errors']})", t.get("empty_answers", 0))
        for role, t in summary["teachers"].items()
    ]
    out.print(_table(("teacher", "model", "accuracy", "tokens in / out", "requests (replayed)",
                      "code runs (errors)", "empty answers"), teachers, wrap=("model",)))
    sent = ", ".join(f"{role} {count}" for role, count in summary["sent_this_run"].items())
    out.print(f"requests sent by this run: {sent} (the rest came from the journal or cached stages)")
    reused = sum(summary.get("reused_across_budget", {}).values())
    if reused:
        out.print(f"answers reused across a max_tokens change: {reused} (finished within the new budget)")
    wrong = {role: t["wrong_by_reason"] for role, t in summary["teachers"].items() if t["wrong_by_reason"]}
    for role, reasons in wrong.items():
        out.print(f"{role} wrong answers by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    print_contaminated(out, summary.get("contaminated") or {})
    out.print(f"sandbox: {summary['sandbox']}   grader: {summary['grader']}")
    for name, path in summary["datasets"].items():
        out.print(f"[bold]{name}[/]: {path}")


def print_contaminated(out: Console, counts: dict[str, int]) -> None:
    """Problems set aside as copies of benchmark items (`decontaminate:`), per benchmark."""
    if counts:
        out.print("set aside as copies of benchmark items (never sent to a model): "
                  + ", ".join(f"{name} {count}" for name, count in counts.items()))


def print_rounds(result: dict) -> None:
    """Self-distillation: one row per round, then each round's datasets and next student."""
    out = results_console()
    rounds = [
        (r["round"], r["student"], r["problems"], r["samples"], f"{r['pass_at_1']:.1%}", f"{r['pass_at_k']:.1%}",
         f"{r['distinct_share']:.0%}", r["examples"].get("verification", 0), r["examples"].get("correction", 0),
         r["rejected"], f"{r['prompt_tokens']} / {r['completion_tokens']}", f"{r['wall_s']:.1f} s")
        for r in result["rounds"]
    ]
    out.print(f"\n[bold]self-distillation {result['run_name']}[/]")
    out.print(_table(("round", "student", "problems", "samples", "pass@1", "pass@K", "distinct", "verification",
                      "correction", "rejected", "tokens in / out", "time"), rounds, wrap=("student",), compact=True))
    for r in result["rounds"]:
        if r["problems_with_duplicates"]:
            out.print(f"[yellow]round {r['round']}: {r['problems_with_duplicates']} problem(s) got duplicate samples[/]")
        for name, path in r["datasets"].items():
            out.print(f"round {r['round']} [bold]{name}[/]: {path}")
        if r["next_student"]:
            out.print(f"round {r['round']} trained the next student: {r['next_student']}")
    out.print(f"accuracy per round: {result['plot']}")
    print_contaminated(out, result.get("contaminated") or {})
    if result.get("contaminated_dataset"):
        out.print(f"[bold]contaminated[/]: {result['contaminated_dataset']}")


def print_leakage(report: dict) -> None:
    """Trait leakage: what the filter kept, one row per test, the behavioural probe, the verdict."""
    from flows.publishing.leakage_report import verdict_line

    out = results_console()
    out.print(f"\n[bold]trait leakage: {report['trait']} ({report['category']})[/], {report['n_prompts']} prompts")
    out.print(f"kept: trait {report['kept_trait']} ({report['pass_rate_trait'] or 0:.0%}), "
              f"control {report['kept_control']} ({report['pass_rate_control'] or 0:.0%})")
    number = (lambda v: "" if v is None else f"{v:.4g}")
    tests = [(t["name"], number(t["statistic"]), number(t["p_value"]), number(t["detail"].get("adjusted_p_value")),
              t["skipped"] or "") for t in report["tests"]]
    out.print(_table(("test", "statistic", "p-value", "adjusted p", "skipped because"), tests))
    if report.get("behavioral"):
        b = report["behavioral"]
        out.print(f"behavioural probe: trait-trained {b['trait_student']['rate']:.1%}, "
                  f"control-trained {b['control_student']['rate']:.1%}")
    out.print(verdict_line(report).replace("**", ""))
    out.print(f"report: {report.get('report_dir', '')}")


def print_audit(audit: Audit) -> None:
    """`distillery grade --audit`: the lines math-verify alone grades the other way, by our reason."""
    out = results_console()
    out.print(f"{audit.source}: {audit.graded} answers graded; math-verify alone grades {audit.disagreements} "
              f"the other way" + (f", and gave no verdict on {audit.unanswered}" if audit.unanswered else ""),
              soft_wrap=True)
    for group, rows in sorted(audit.by_reason.items(), key=lambda item: -len(item[1])):
        lines = [(row.line, escape(row.gold), escape(row.extracted or "—"), _mark(row.ours), _mark(row.math_verify))
                 for row in rows]
        out.print(_table(("line", "gold", "extracted", "ours", "math-verify"), lines, wrap=("gold", "extracted"),
                         title=escape(f"{group}: {len(rows)}"), title_justify="left"))


def _mark(correct: bool) -> str:
    return "right" if correct else "wrong"


def print_plan(made: Plan) -> None:
    """`distillery plan`: one row per role (answers, requests, tokens, time, cost), then how
    each figure was reached, the wall time and the notes."""
    from flows.orchestration.plan import format_seconds, rounded

    out = results_console()
    pilot = f"pilot of {made.pilot}" if made.pilot else "no pilot: bounds from the recipe"
    out.print(f"\n[bold]plan {made.run_name}[/] ({made.job}): {made.units:,} "
              f"{'prompts' if made.job == 'leakage' else 'problems'}; {pilot}")
    money = (lambda v: "—" if v is None else f"{v:,.2f}")
    roles = [(r.role + (" (batch)" if r.mode == "batch" else ""), r.model, f"{r.answers:,}", rounded(r.requests),
              rounded(r.prompt_tokens), rounded(r.completion_tokens), format_seconds(r.seconds),
              money(r.cost_online), money(r.cost_batch)) for r in made.roles]
    out.print(_table(("role", "model", "answers", "requests", "prompt tokens", "completion tokens", "time",
                      "cost online", "cost batch"), roles, wrap=("model",)))
    for r in made.roles:
        out.print(escape(f"{r.role}: {r.basis}" + (f"; time from {r.time_basis}" if r.time_basis else "")))
    out.print(f"wall time: {format_seconds(made.wall_s)}"
              + (f"; budget caps: {made.budget}" if made.budget else ""))
    for note in made.notes:
        out.print(f"note: {note}")
