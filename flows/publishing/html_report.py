"""`report.html`: one self-contained page per run, built from what the run wrote.

In:  a finished run's output folder (`recipe.work_dir`): its published datasets and summary
     (DualDistill: `.distillery/summary.json`, `composites/`, `trajectories/`, `rejected/`,
     `contaminated/`; self-distillation: `self_distill/summary.json` and each round's datasets;
     leakage: `leakage/report.json`, its plots and `leakage/numbers/`).
Out: `output_dir/report.html`, one file that opens offline: inline CSS, charts drawn as
     inline SVG from the data, the leakage plots inlined as `data:` PNGs, no script, and a
     Content-Security-Policy that forbids every fetch. Model text is escaped.
Run: the flows call `write_html_report(recipe.work_dir, job, recipe.run_name)` after they
     publish; `build_report_html` is the same page as a string (a pure function of the folder).

What each page shows: DualDistill: the summary, cases, accuracy per teacher, token-length
distributions per teacher and case, grade reasons, code runs and errors, the grader audit,
decontamination counts, and the first rows of each case with trained and untrained spans
apart. Self-distillation: every round (the same figures of its samples, and its examples per
kind). Leakage: the verdict, the tests, the filter, the plots, the probe and sample completions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flows.publishing import html_sections as sections
from flows.publishing.html_data import answer_figures, first_rows_per, head, pair_lengths, values_by
from flows.publishing.html_parts import (
    Html,
    bars,
    cell,
    details,
    esc,
    join,
    line_chart,
    page,
    percent,
    png,
    pre,
    prose,
    table,
    tag,
)
from flows.publishing.leakage_report import verdict_line
from flows.publishing.report import CASES

REPORT_NAME = "report.html"
SAMPLES_PER_CASE = 3
LEAKAGE_SAMPLES = 5  # completions shown per teacher, kept and rejected each

JOBS = ("dualdistill", "self_distill", "leakage")


def write_html_report(work_dir: Path, job: str, run_name: str) -> Path:
    """`report.html` under `work_dir` (written whole, then swapped in); returns its path."""
    path = Path(work_dir) / REPORT_NAME
    staging = path.with_name(f".{REPORT_NAME}.tmp-{os.getpid()}")
    staging.write_text(build_report_html(work_dir, job, run_name), encoding="utf-8")
    staging.replace(path)
    return path


def build_report_html(work_dir: Path, job: str, run_name: str) -> str:
    """The page of the run whose outputs are in `work_dir`."""
    builders = {"dualdistill": dualdistill_page, "self_distill": self_distill_page, "leakage": leakage_page}
    if job not in builders:
        raise ValueError(f"report.html: unknown job {job!r} (expected one of {', '.join(JOBS)})")
    return builders[job](Path(work_dir), run_name)


# --- DualDistill ----------------------------------------------------------------------------------


def dualdistill_page(work_dir: Path, run_name: str) -> str:
    summary = json.loads((work_dir / ".distillery" / "summary.json").read_text())
    folders = {name: work_dir / name for name in ("composites", "trajectories", "rejected", "contaminated")}
    figures = answer_figures(folders["trajectories"])
    return page(f"DualDistill run {run_name}", "Distillery report: composites of a tool-using and a reasoning teacher", [
        ("summary", "Summary", _dd_summary(work_dir, summary, folders)),
        ("cases", "Cases", _dd_cases(summary)),
        ("teachers", "Accuracy per teacher", _dd_teachers(summary)),
        ("lengths", "Token lengths", _dd_lengths(folders)),
        ("grades", "Grade reasons", sections.grade_reasons(figures)),
        ("code", "Code runs and errors", sections.code_runs(figures)),
        ("audit", "Grader audit", sections.audit(figures)),
        ("decontamination", "Decontamination",
         sections.decontamination(work_dir, summary.get("contaminated"), folders["contaminated"])),
        ("trajectories", "Trajectories", _dd_trajectories(folders)),
    ])


def _dd_summary(work_dir: Path, summary: dict, folders: dict[str, Path]) -> Html:
    sent = ", ".join(f"{role} {n}" for role, n in summary.get("sent_this_run", {}).items()) or "none"
    reused = ", ".join(f"{role} {n}" for role, n in summary.get("reused_across_budget", {}).items()) or "none"
    facts = [("problems", cell(summary["problems"], data_fact="problems")),
             ("composites", cell(summary["composites"], data_fact="composites")),
             ("rejected pairs", cell(summary["rejected"], data_fact="rejected")),
             ("wall time", f"{summary.get('wall_s', 0):.1f} s"), ("sandbox", summary.get("sandbox", "")),
             ("grader", summary.get("grader", "")), ("requests sent by this run", sent),
             ("answers reused across a max_tokens change", reused)]
    return table(None, facts) + tag("h3", "Datasets") + sections.datasets_table(work_dir, folders)


_CASE_RULES = {"both_correct": "first + verification phrase + second", "first_correct": "first alone",
               "second_corrects": "first (not trained) + correction phrase + second",
               "both_wrong": "dropped (kept in rejected/ with the reason)"}


def _dd_cases(summary: dict) -> Html:
    cases = summary["cases"]
    total = sum(cases.values()) or 1
    rows = [[case, cell(cases.get(case, 0), data_case=case), percent(cases.get(case, 0) / total), _CASE_RULES[case]]
            for case in CASES]
    chart = bars([(case, cases.get(case, 0) / total, f"{cases.get(case, 0)} pairs") for case in CASES],
                 label="Pairs per case (share of all pairs)")
    return table(["case", "pairs", "share", "what is published"], rows) + chart


def _dd_teachers(summary: dict) -> Html:
    rows, items = [], []
    for role, t in summary["teachers"].items():
        rows.append([role, t["model"], t["answers"], t["correct"], cell(percent(t["accuracy"]), data_teacher=role),
                     t["prompt_tokens"], t["completion_tokens"], f"{t['requests']} ({t['replayed_requests']})",
                     f"{t['tool_calls']} ({t['tool_errors']})", t["truncated"], t["empty_answers"]])
        items.append((role, t["accuracy"], f"{percent(t['accuracy'])} of {t['answers']}"))
    headers = ["teacher", "model", "answers", "correct", "accuracy", "prompt tokens", "completion tokens",
               "requests (replayed)", "code runs (failed)", "cut by max_tokens", "empty answers"]
    return table(headers, rows) + bars(items, label="Accuracy per teacher")


def _dd_lengths(folders: dict[str, Path]) -> Html:
    per_teacher = values_by(folders["trajectories"], "completion_tokens", "teacher")
    per_case = pair_lengths([folders["composites"], folders["rejected"]], folders["trajectories"])
    per_case = {case: per_case[case] for case in CASES if case in per_case}
    edges = sections.shared_edges(per_teacher, *per_case.values())
    return join([
        prose("Completion tokens of each answer (as the endpoint counted them; a tool-using answer sums its "
              "requests). Every chart uses the same bins."),
        tag("h3", "Per teacher"), sections.length_charts({"all answers": per_teacher}, edges, "completion tokens"),
        sections.length_stats(per_teacher, "teacher"),
        tag("h3", "Per case and teacher"), sections.length_charts(per_case, edges, "completion tokens"),
    ])


def _right(correct: bool) -> str:
    return "right" if correct else "wrong"


def _dd_trajectories(folders: dict[str, Path]) -> Html:
    columns = ["id", "case", "first_teacher", "second_teacher", "first_model", "second_model", "g1", "g2",
               "transition", "mask_until", "messages"]
    by_case = first_rows_per(folders["composites"], "case", CASES[:3], SAMPLES_PER_CASE, columns)
    parts = [sections.samples_intro("case", SAMPLES_PER_CASE)]
    for case in CASES[:3]:
        rows = by_case.get(case, [])
        parts.append(tag("h3", f"{case} ({len(rows)} shown)"))
        parts += [sections.conversation(
            row, f"{row['id']}: {row['first_teacher']}"
                 + (" alone" if case == "first_correct" else f" then {row['second_teacher']}"),
            [("case", row["case"]),
             ("first", f"{row['first_teacher']} ({row['first_model']}), {_right(row['g1'])}"),
             ("second", f"{row['second_teacher']} ({row['second_model']}), {_right(row['g2'])}"),
             ("transition", row["transition"] or "(none)"), ("mask_until", row["mask_until"])],
            open_=i == 0, data_id=row["id"], data_case=case, data_first=row["first_teacher"])
            for i, row in enumerate(rows)]
        if not rows:
            parts.append(tag("p", "No pair in this case.", class_="empty"))
    rejected = head(folders["rejected"], SAMPLES_PER_CASE)
    parts.append(tag("h3", f"both_wrong ({len(rejected)} shown): not training data"))
    parts += [sections.rejected_pair(
        row, f"{row['id']}: {row['reason']}", [(f"first ({row['first_teacher']})", row["first_text"]),
                                               ("second", row["second_text"])],
        [("reason", row["reason"]), ("extracted", f"{row['first_extracted']} / {row['second_extracted']}"),
         ("gold", row["answer"])], data_id=row["id"], data_case="both_wrong") for row in rejected]
    return join(parts)


# --- self-distillation ----------------------------------------------------------------------------


def self_distill_page(work_dir: Path, run_name: str) -> str:
    out = work_dir / "self_distill"
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    parts = [("summary", "Rounds", _sd_summary(work_dir, rounds))]
    parts += [(f"round-{r['round']}", f"Round {r['round']}", _sd_round(out, r)) for r in rounds]
    parts.append(("decontamination", "Decontamination",
                  sections.decontamination(work_dir, summary.get("contaminated"), out / "contaminated")))
    return page(f"Self-distillation run {run_name}",
                f"Distillery report: {len(rounds)} round(s) of a student's own samples, grader {summary.get('grader', '')}",
                parts)


def _sd_summary(work_dir: Path, rounds: list[dict]) -> Html:
    headers = ["round", "student", "problems", "samples", "mean score", "pass@1", "pass@K", "distinct",
               "verification", "correction", "rejected", "tokens in / out", "math-verify disagrees", "time"]
    rows = [[cell(r["round"], data_round=r["round"]), r["student"], r["problems"], r["samples"],
             f"{r['mean_score']:.3f}", percent(r["pass_at_1"]), percent(r["pass_at_k"]), percent(r["distinct_share"]),
             r["examples"].get("verification", 0), r["examples"].get("correction", 0), r["rejected"],
             f"{r['prompt_tokens']} / {r['completion_tokens']}", r.get("disagree_with_math_verify", 0),
             f"{r['wall_s']:.1f} s"] for r in rounds]
    chart = line_chart([r["round"] for r in rounds], {"pass@1 (mean score)": [r["pass_at_1"] for r in rounds],
                                                      "pass@K": [r["pass_at_k"] for r in rounds]},
                       label="Student accuracy per round")
    warnings = [tag("p", f"round {r['round']}: {r['problems_with_duplicates']} problem(s) got duplicate samples",
                    class_="note") for r in rounds if r.get("problems_with_duplicates")]
    return table(headers, rows) + chart + join(warnings)


def _sd_round(out: Path, r: dict) -> Html:
    number = r["round"]
    folders = {"examples": out / f"round-{number}", "samples": out / f"round-{number}-samples",
               "rejected": out / f"round-{number}-rejected"}
    figures = answer_figures(folders["samples"], group="model")
    graded = values_by(folders["samples"], "completion_tokens", "correct", label=_right)
    by_grade = {name: graded[name] for name in ("right", "wrong") if name in graded}
    edges = sections.shared_edges(by_grade)
    next_student = r.get("next_student") or "(no trainer ran)"
    parts = [table(None, [("student", r["student"]), ("next student", next_student)]),
             sections.datasets_table(out.parent, folders),
             tag("h3", "Token lengths of the samples"),
             sections.length_charts({f"round {number} samples": by_grade}, edges, "completion tokens"),
             sections.length_stats(by_grade, "graded"),
             tag("h3", "Grade reasons"), sections.grade_reasons(figures, who="student"),
             tag("h3", "Grader audit"), sections.audit(figures, who="student"),
             tag("h3", "Code runs and errors"), sections.code_runs(figures, who="student"),
             tag("h3", "Examples"), sections.samples_intro("kind", SAMPLES_PER_CASE)]
    columns = ["id", "kind", "sample", "pick", "n_correct", "k", "student_strategy", "teacher_strategy",
               "transition", "mask_until", "student_model", "teacher_model", "messages"]
    by_kind = first_rows_per(folders["examples"], "kind", ("verification", "correction"), SAMPLES_PER_CASE, columns)
    for kind in ("verification", "correction"):
        rows = by_kind.get(kind, [])
        parts.append(tag("h3", f"{kind} ({len(rows)} shown)"))
        parts += [sections.conversation(
            row, f"{row['id']}: sample {row['sample']} ({row['student_strategy']}) then {row['teacher_strategy']}",
            [("kind", kind), ("correct samples", f"{row['n_correct']} of {row['k']}"), ("picked", row["pick"]),
             ("transition", row["transition"]), ("mask_until", row["mask_until"]),
             ("models", f"{row['student_model']} then {row['teacher_model']}")],
            open_=i == 0, data_id=row["id"], data_case=kind, data_round=number) for i, row in enumerate(rows)]
    rejected = head(folders["rejected"], SAMPLES_PER_CASE)
    parts.append(tag("h3", f"Picks that gave no example ({len(rejected)} shown)"))
    parts += [sections.rejected_pair(row, f"{row['id']} {row['kind']}: {row['reason']}",
                                     [("student sample", row["student_text"]), ("teacher part", row["teacher_text"])],
                                     [("reason", row["reason"]), ("sample", row["sample"])], data_id=row["id"],
                                     data_round=number) for row in rejected]
    return join(parts)


# --- leakage --------------------------------------------------------------------------------------


def leakage_page(work_dir: Path, run_name: str) -> str:
    out = work_dir / "leakage"
    report = json.loads((out / "report.json").read_text())
    return page(f"Trait-leakage check {run_name}",
                f"Distillery report: does the trait “{report['trait']}” ({report['category']}) show in number sequences?",
                [("verdict", "Verdict", _verdict(report)),
                 ("tests", "Tests", _tests(report["tests"])),
                 ("filter", "Filter", _filter(report)),
                 ("numbers", "Over-represented numbers and digits", _over_represented(report, out)),
                 ("probe", "Behavioural probe", _probe(report.get("behavioral"))),
                 ("completions", "Sample completions", _completions(out / "numbers")),
                 ("limitations", "Limitations", tag("ul", join(tag("li", s) for s in report["limitations"])))])


def _verdict(report: dict) -> Html:
    line = esc(verdict_line(report)).replace("**", "")
    kind = "leak" if report["leak_detected"] else "clean"
    return tag("p", Html(line), class_=f"verdict {kind}", data_leak=str(bool(report["leak_detected"])).lower())


def _number(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tests(tests: list[dict]) -> Html:
    rows = [[cell(t["name"], data_test=t["name"]), _number(t["statistic"]), _number(t["p_value"]),
             _number((t.get("detail") or {}).get("adjusted_p_value")), t["skipped"] or ""] for t in tests]
    return table(["test", "statistic", "p-value", "adjusted p", "skipped because"], rows, empty="No tests.")


def _filter(report: dict) -> Html:
    passes = table(["teacher", "kept", "pass rate"],
                   [["trait", cell(report["kept_trait"], data_kept="trait"), percent(report["pass_rate_trait"])],
                    ["control", cell(report["kept_control"], data_kept="control"), percent(report["pass_rate_control"])]])
    reasons = report["reject_reasons"]
    names = sorted(reasons["trait"].keys() | reasons["control"].keys())
    rejected = table(["reject reason", "trait", "control"],
                     ([n, reasons["trait"].get(n, 0), reasons["control"].get(n, 0)] for n in names),
                     empty="No completion was rejected.")
    return prose(f"{report['n_prompts']} prompts, answered by both teachers.") + passes + rejected


def _rows(rows: list[dict]) -> Html:
    columns = list(rows[0]) if rows else []
    return table(columns, ([_number(row.get(c)) for c in columns] for row in rows), empty="None.")


def _over_represented(report: dict, out: Path) -> Html:
    return join([tag("h3", "Numbers"), _rows(report["top_numbers"]), tag("h3", "Leading and trailing digits"),
                 _rows(report["top_digits"]), tag("h3", "Plots"), png(out / "numbers.png", "Number frequencies"),
                 png(out / "digits.png", "Leading and trailing digits")])


def _probe(behavioral: dict | None) -> Html:
    if behavioral is None:
        return tag("p", "Not run.", class_="empty")
    rows = [[label, f"{rate['count']} / {rate['n']}", percent(rate["rate"]),
             f"{percent(rate['ci_low'])} – {percent(rate['ci_high'])}"]
            for label, rate in (("trait-trained", behavioral["trait_student"]),
                                ("control-trained", behavioral["control_student"]))]
    comparison = behavioral["comparison"]
    return (table(["student", "names the trait", "rate", "95% interval (Wilson)"], rows)
            + tag("p", f"One-sided test that the trait-trained student names the trait more often: difference "
                       f"{_number(comparison['statistic'])}, p = {_number(comparison['p_value'])}.", class_="note"))


def _completions(folder: Path) -> Html:
    parts = []
    for teacher in ("trait", "control"):
        for kept in (True, False):
            rows = head(folder, LEAKAGE_SAMPLES, {"teacher": teacher, "kept": kept},
                        ["prompt_index", "prompt", "completion", "reason"])
            label = f"{teacher} teacher, {'kept' if kept else 'rejected'} ({len(rows)} shown)"
            body = join(tag("div", tag("p", f"prompt {r['prompt_index']}" + (f": {r['reason']}" if r["reason"] else ""),
                                       class_="role") + pre(r["prompt"]) + pre(r["completion"], class_="turn"),
                            data_teacher=teacher) for r in rows)
            parts.append(details(label, body or tag("p", "None.", class_="empty")))
    return join(parts)
