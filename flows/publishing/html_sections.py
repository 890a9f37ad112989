"""Sections of `report.html` that DualDistill and self-distillation share: grade reasons, the
grader audit, code runs and errors, token lengths, decontamination, and trajectory samples
with their trained and untrained spans. Each takes what `html_data` read and returns `Html`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.publishing.html_data import AUDIT_ROWS, ERROR_ROWS_READ, AnswerFigures, head, row_count
from flows.publishing.html_parts import (
    LEGEND,
    Html,
    bin_edges,
    cell,
    details,
    esc,
    histogram,
    join,
    pre,
    prose,
    span_counts,
    spans,
    table,
    tag,
)

CONTAMINATED_ROWS = 10


def _note(text: str) -> Html:
    return prose(text)


def grade_reasons(figures: AnswerFigures, who: str = "teacher") -> Html:
    """Wrong answers by reason per group, what decided each grade, and a few examples per reason."""
    reasons = sorted({r for counts in figures.wrong_by_reason.values() for r in counts})
    groups = list(figures.graded_by)
    wrong = table([who, *reasons], ([g, *(cell(figures.wrong_by_reason.get(g, {}).get(r, 0), data_reason=r)
                                          for r in reasons)] for g in groups if figures.wrong_by_reason.get(g)),
                  empty="No answer was graded wrong.")
    methods = sorted({m for counts in figures.graded_by.values() for m in counts})
    decided = table([who, *methods], ([g, *(figures.graded_by[g].get(m, 0) for m in methods)] for g in groups))
    examples = table(["reason", who, "problem", "sample", "extracted", "grade reason", "finish"],
                     ([e["reason"], e["group"], e["problem_id"], e["sample"], e["extracted"], e["grade_reason"],
                       e["finish_reason"]] for e in figures.reason_examples), empty="No examples.")
    return join([tag("h3", "Wrong answers by reason"), wrong,
                 tag("h3", "Decided by (grade_method)"), decided,
                 details("Examples (the first few of each reason)", examples)])


def audit(figures: AnswerFigures, who: str = "teacher") -> Html:
    """Answers that math-verify alone grades the other way (`math_verify_correct`)."""
    counts = table([who, "answers", "graded the other way by math-verify"],
                   ([g, sum(figures.graded_by[g].values()), cell(figures.disagreements.get(g, 0), data_group=g)]
                    for g in figures.graded_by))
    verdict = (lambda ok: "right" if ok else "wrong")
    rows = table(["problem", who, "sample", "ours", "math-verify", "grade_method", "parse_status", "extracted",
                  "our reason"],
                 ([a["problem_id"], a["group"], a["sample"], verdict(a["correct"]), verdict(a["math_verify_correct"]),
                   a["grade_method"], a["parse_status"], a["extracted"], a["grade_reason"]] for a in figures.audit),
                 empty="No disagreement: math-verify alone grades every answer as we do.")
    total = sum(figures.disagreements.values())
    more = f" The first {AUDIT_ROWS} of {total} are listed." if total > AUDIT_ROWS else ""
    return join([_note("Our grader decides by rules first; `math_verify_correct` is math-verify's verdict alone. "
                       "Where they differ, `distillery grade --audit` shows why." + more), counts, rows])


def code_runs(figures: AnswerFigures, who: str = "teacher") -> Html:
    """Code executions and failures per group, failures by kind, and a few failed runs."""
    headers = [who, "answers", "with code", "code runs", "failed runs", "answers with a failed run",
               "stopped at the tool-call limit"]
    runs = table(headers, ([g, c["answers"], c["answers_with_code"], c["runs"], cell(c["failed"], data_group=g),
                            c["answers_with_failure"], c["tool_limit"]] for g, c in figures.code.items()))
    kinds = table(["ended with", "failed runs"], figures.error_kinds.most_common(), empty="No code run failed.")
    read = (f" (from the first {ERROR_ROWS_READ} answers with a failed run)"
            if figures.errors_read >= ERROR_ROWS_READ else "")
    examples = join(tag("div", tag("p", f"{e['group']}, problem {e['problem_id']} (sample {e['sample']})",
                                   class_="role") + pre(e["code"]) + pre(e["output"], class_="error"))
                    for e in figures.error_examples)
    return join([runs, tag("h3", "Failed runs by how they ended" + read), kinds,
                 details("Failed runs (the first few)", examples or tag("p", "None.", class_="empty"))])


def length_charts(groups: Mapping[str, Mapping[str, Sequence[int]]], edges: Sequence[int], what: str) -> Html:
    """One histogram per group (e.g. per case), the series (e.g. teachers) side by side."""
    return tag("div", join(tag("div", histogram(series, edges, label=f"{name}: {what}"), data_chart=name)
                           for name, series in groups.items()), class_="grid2")


def length_stats(series: Mapping[str, Sequence[int]], label: str) -> Html:
    def quantile(values: list[int], q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))]

    rows = []
    for name, values in series.items():
        ordered = sorted(values)
        if ordered:
            rows.append([name, len(ordered), quantile(ordered, 0.5), quantile(ordered, 0.9), ordered[-1],
                         round(sum(ordered) / len(ordered))])
    return table([label, "answers", "median", "p90", "max", "mean"], rows)


def shared_edges(*series: Mapping[str, Sequence[int]]) -> list[int]:
    return bin_edges(v for s in series for values in s.values() for v in values)


def decontamination(work_dir: Path, counts: Mapping[str, int] | None, folder: Path) -> Html:
    """Problems set aside per benchmark, and the first few with the item they copy."""
    if not counts and row_count(folder) is None:
        return prose("Not configured for this run (no `decontaminate:` in the recipe).", class_="empty")
    summary = table(["benchmark", "problems set aside"],
                    ([name, cell(count, data_benchmark=name)] for name, count in (counts or {}).items()))
    rows = head(folder, CONTAMINATED_ROWS, columns=["id", "problem", "benchmark", "benchmark_problem", "method",
                                                     "score", "shared"])
    listed = table(["problem id", "problem", "benchmark", "benchmark item", "method", "score", "shared"],
                   ([r["id"], r["problem"], r["benchmark"], r["benchmark_problem"], r["method"], round(r["score"], 1),
                     r["shared"]] for r in rows), empty="No problem was set aside.")
    return join([_note("Problems that copy a benchmark item were set aside before any model call; "
                       f"`{_relative(work_dir, folder)}/` lists them."), summary,
                 details(f"The first {CONTAMINATED_ROWS} set aside", listed)])


def _relative(work_dir: Path, folder: Path) -> str:
    return folder.relative_to(work_dir).as_posix() if folder.is_relative_to(work_dir) else str(folder)


def datasets_table(work_dir: Path, folders: Mapping[str, Path]) -> Html:
    return table(["dataset", "rows", "folder (under output_dir)"],
                 ([name, cell(rows, data_dataset=name), _relative(work_dir, folder) + "/"]
                  for name, folder in folders.items() if (rows := row_count(folder)) is not None),
                 empty="No dataset was published.")


# --- trajectories ---------------------------------------------------------------------------------


def conversation(row: Mapping[str, Any], label: str, facts: Sequence[tuple[str, Any]], *, open_: bool,
                 **attrs: Any) -> Html:
    """One published SFT row: its turns, each assistant turn with its spans shown apart."""
    turns, trained, untrained = [], 0, 0
    for message in row["messages"] or []:
        detail = message.get("train_detail")
        if message["role"] == "assistant":
            yes, no = span_counts(message["content"], detail)
            trained, untrained = trained + yes, untrained + no
        turns.append(tag("div", tag("p", message["role"], class_="role") + spans(message["content"], detail),
                         class_="message", data_role=message["role"]))
    summary = f"{label}: {trained} characters trained, {untrained} not trained"
    facts_table = table(None, facts)
    return tag("article", details(summary, facts_table + join(turns), open_=open_), class_="trajectory",
               data_trained=trained, data_untrained=untrained, **attrs)


def rejected_pair(row: Mapping[str, Any], label: str, texts: Sequence[tuple[str, str]],
                  facts: Sequence[tuple[str, Any]], **attrs: Any) -> Html:
    """A row that is not training data: its texts plain, with the reason."""
    body = table(None, facts) + join(tag("p", name, class_="role") + pre(text, class_="turn")
                                         for name, text in texts)
    return tag("article", details(label, body), class_="rejected", **attrs)


def samples_intro(per: str, shown: int) -> Html:
    return join([LEGEND, _note(f"The first {shown} rows of each {per}, in the dataset's order. Model text is shown "
                               "as written (escaped); executor output, failed code and failed first attempts "
                               "are the untrained spans.")])
