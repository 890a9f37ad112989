"""report.html: the page builder on hand-made outputs (no Prefect, no browser), then each job's
page from a real flow run, opened in headless Chromium (skipped, saying why, without one)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from flows.detection.verdict import combine
from flows.publishing.html_data import error_kind
from flows.publishing.html_parts import bin_edges, counts_in, histogram, spans
from flows.publishing.html_report import REPORT_NAME, build_report_html, write_html_report
from flows.publishing.leakage_report import build_report, write_report
from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset, read_dataset_rows
from flows.publishing.report import summarise
from flows.training.masks import sft_messages, trained_text, untrained_ranges
from schemas.leakage import TestResult
from schemas.records import Composite, Contaminated, GradedTrajectory, NumberCompletion, Rejected, ToolSpan

HOSTILE = '</pre><script>alert("x")</script><img src="http://example.com/x.png">'


# --- a page as a tree, to read what it shows --------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None = None) -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and all(
                        child.attrs.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items()):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        (node,) = self.all(tag, **attrs)
        return node


class _Tree(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "input", "link", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.at = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_startendtag(self, tag, attrs):
        self.at.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.at))

    def handle_endtag(self, tag):
        node = self.at
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.at = node.parent

    def handle_data(self, data):
        self.at.children.append(data)


def tree(html: str) -> Node:
    parser = _Tree()
    parser.feed(html)
    return parser.root


def span_parts(article: Node) -> list[tuple[str, str]]:
    """(trained | untrained | gap, text) of an article's assistant turn."""
    (assistant,) = [m for m in article.all("div", class_="message") if m.attrs["data-role"] == "assistant"]
    return [(s.attrs["data-train"], s.text()) for s in assistant.all("span") if "data-train" in s.attrs]


def fetched_urls(html: str) -> list[str]:
    """Every URL the page's markup or styles point at that is not an anchor or a data: URI:
    what opening it could fetch."""
    page = tree(html)
    found = [value for node in page.all() for name, value in node.attrs.items()
             if name in ("src", "href", "srcset", "action", "poster", "xlink:href", "data", "background")]
    styles = [n.text() for n in page.all("style")] + [n.attrs["style"] for n in page.all() if "style" in n.attrs]
    found += [u for css in styles for u in re.findall(r"(?:url\(|@import)\s*['\"]?([^'\")\s;]*)", css)]
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    return [u for u in found if not u.startswith(("#", "data:"))]


# --- the builder, without a browser -----------------------------------------------------------------


def test_spans_are_shown_apart_and_model_text_is_escaped():
    content = f"Try {HOSTILE}\n<executor>\nboom\n</executor>\nDone & dusted."
    start = content.index("<executor>")
    detail = [{"begin_offset": 0, "end_offset": start - 1, "train": True},
              {"begin_offset": start, "end_offset": content.index("Done") - 1, "train": False},
              {"begin_offset": content.index("Done"), "end_offset": len(content) - 1, "train": True}]
    markup = spans(content, detail)
    assert "<script>" not in markup and "<img" not in markup and "&lt;script&gt;" in markup
    parts = [(s.attrs["data-train"], s.text()) for s in tree(markup).all("span")]
    assert parts == [("trained", content[:start]), ("untrained", "<executor>\nboom\n</executor>\n"),
                     ("trained", "Done & dusted.")]
    assert "".join(text for _, text in parts) == content
    clipped = tree(spans(content, detail, limit=10))
    assert clipped.text().startswith(content[:10]) and f"{len(content) - 10} more characters" in clipped.text()


def test_histogram_bars_carry_their_counts():
    values = {"tool": [0, 5, 19, 20, 120], "reasoning": [300, 301]}
    edges = bin_edges(v for vs in values.values() for v in vs)
    assert edges[0] == 0 and edges[-1] > 301 and len({b - a for a, b in itertools.pairwise(edges)}) == 1
    assert sum(counts_in(values["tool"], edges)) == 5
    svg = tree(histogram(values, edges, label="lengths"))
    for name, numbers in values.items():
        assert sum(int(r.attrs["data-count"]) for r in svg.all("rect", data_series=name)) == len(numbers)
    assert "no answers" in histogram({"tool": []}, [0, 1], label="x")


def test_error_kind_names_the_exception_or_the_last_line():
    assert error_kind("<executor>\nTraceback (most recent call last):\nZeroDivisionError: division by zero\n"
                      "</executor>") == "ZeroDivisionError"
    assert error_kind("<executor>\ntimed out after 5 s\n</executor>") == "timed out after 5 s"


def _publish(folder: Path, rows: list, model) -> None:
    publish_dataset(folder, rows, features_for(model), DatasetCardInfo(title=folder.name, description="test", sections={}))


def _graded(problem_id: str, teacher: str, text: str, correct: bool, tokens: int, **extra) -> GradedTrajectory:
    return GradedTrajectory(problem_id=problem_id, teacher=teacher, model=f"m-{teacher}", text=text,
                            finish_reason="stop", completion_tokens=tokens, correct=correct,
                            extracted="7" if correct else "8", grade_reason="equal" if correct else "not_equivalent: 8",
                            messages=sft_messages("q", text, untrained_ranges(extra.get("tool_spans", []))), **extra)


def dualdistill_outputs(out: Path) -> Path:
    """A run's outputs by hand: one composite per trained case, a rejected pair, a failed code run,
    a math-verify disagreement, a contaminated problem and hostile model text."""
    failed = f"<code>\n1/0\n</code>\n<executor>\nTraceback (most recent call last):\nZeroDivisionError: {HOSTILE}\n</executor>\n"
    spans_ = [ToolSpan(kind="code", start=0, end=failed.index("<executor>") - 1, failed=True),
              ToolSpan(kind="executor", start=failed.index("<executor>"), end=len(failed) - 1, failed=True)]
    graded = [
        _graded("a", "tool", failed + "\\boxed{7}", True, 30, tool_spans=spans_, tool_calls=1, tool_errors=1),
        _graded("a", "reasoning", "<think>7</think>\\boxed{7}", True, 300, math_verify_correct=False),
        _graded("b", "tool", "\\boxed{8}", False, 12),
        _graded("b", "reasoning", "\\boxed{7}", True, 280),
        _graded("c", "tool", "\\boxed{8}", False, 9),
        _graded("c", "reasoning", "\\boxed{8}", False, 250),
    ]
    first = graded[0].text
    joined = first + "\nWait, verify.\n" + graded[1].text
    composite = Composite(id="a", problem=f"What is 3+4? {HOSTILE}", answer="7", first_teacher="tool",
                          second_teacher="reasoning", g1=True, g2=True, case="both_correct", transition="Wait, verify.",
                          text=joined, messages=sft_messages(f"What is 3+4? {HOSTILE}", joined, untrained_ranges(spans_)),
                          mask_until=0, first_model="m-tool", second_model="m-reasoning")
    corrected_text = "\\boxed{8}\nWait, no.\n\\boxed{7}"
    corrected = Composite(id="b", problem="b?", answer="7", first_teacher="tool", second_teacher="reasoning", g1=False,
                          g2=True, case="second_corrects", transition="Wait, no.", text=corrected_text,
                          messages=sft_messages("b?", corrected_text, [(0, 10)]), mask_until=10,
                          first_model="m-tool", second_model="m-reasoning")
    rejected = Rejected(id="c", problem="c?", answer="7", first_teacher="tool", g1=False, g2=False, case="both_wrong",
                        reason="both_wrong: tool: not_equivalent", first_text=HOSTILE, second_text="\\boxed{8}",
                        first_extracted="8", second_extracted="8")
    _publish(out / "composites", [composite, corrected], Composite)
    _publish(out / "trajectories", graded, GradedTrajectory)
    _publish(out / "rejected", [rejected], Rejected)
    _publish(out / "contaminated", [Contaminated(
        id="d", problem="copy", source="p.jsonl", source_row=3, benchmark="MATH-500", benchmark_problem="copy!",
        benchmark_row=0, benchmark_id=None, method="fuzzy", score=97.5, shared="copy")], Contaminated)
    summary = summarise("hand-made", 3, graded, [composite, corrected], [rejected])
    summary.contaminated = {"MATH-500": 1}
    (out / ".distillery").mkdir(parents=True)
    (out / ".distillery" / "summary.json").write_text(json.dumps(summary.to_dict()))
    return out


def test_dualdistill_page_shows_the_run_and_escapes_model_text(tmp_path):
    out = dualdistill_outputs(tmp_path / "out")
    html = build_report_html(out, "dualdistill", "hand-made")
    assert "<script" not in html and fetched_urls(html) == [] and "http://example.com" in html  # shown, as text
    page = tree(html)
    assert [s.attrs["id"] for s in page.all("section")] == ["summary", "cases", "teachers", "lengths", "grades",
                                                             "code", "audit", "decontamination", "trajectories"]
    cases = {td.attrs["data-case"]: int(td.text()) for td in page.all("td") if "data-case" in td.attrs}
    assert cases == {"both_correct": 1, "first_correct": 0, "second_corrects": 1, "both_wrong": 1}
    assert page.one("td", data_teacher="reasoning").text() == "66.7%"
    assert {td.attrs["data-dataset"]: td.text() for td in page.all("td") if "data-dataset" in td.attrs} == {
        "composites": "2", "trajectories": "6", "rejected": "1", "contaminated": "1"}
    assert page.one("td", data_benchmark="MATH-500").text() == "1"
    audit = page.one("section", id="audit")
    assert audit.one("td", data_group="reasoning").text() == "1" and "math-verify" in audit.text()
    code = page.one("section", id="code")
    assert code.one("td", data_group="tool").text() == "1" and "ZeroDivisionError" in code.text()
    assert "not_equivalent" in page.one("section", id="grades").text()
    lengths = page.one("section", id="lengths")
    per_case = {d.attrs["data-chart"]: d for d in lengths.all("div") if "data-chart" in d.attrs}
    assert set(per_case) == {"all answers", "both_correct", "second_corrects", "both_wrong"}
    tool_bars = per_case["both_correct"].all("rect", data_series="tool")
    assert sum(int(r.attrs["data-count"]) for r in tool_bars) == 1

    parts = span_parts(page.one("article", data_id="a"))
    text, detail = composite_text(out, "a"), composite_detail(out, "a")
    assert "".join(t for _, t in parts) == text
    assert "".join(t for k, t in parts if k == "trained") == trained_text(text, detail)
    assert [t for k, t in parts if k == "untrained"] == [text[s.begin_offset:s.end_offset + 1] for s in detail
                                                          if not s.train]
    assert parts[0][1].startswith("<code>") and "ZeroDivisionError" in parts[2][1] and parts[0][0] == "untrained"
    assert span_parts(page.one("article", data_id="b"))[0] == ("untrained", "\\boxed{8}\n")
    assert HOSTILE in page.one("article", data_id="c").text()


def composite_text(out: Path, row_id: str) -> str:
    return next(r["text"] for r in read_dataset_rows(out / "composites") if r["id"] == row_id)


def composite_detail(out: Path, row_id: str) -> list:
    from schemas.records import TrainSpan

    row = next(r for r in read_dataset_rows(out / "composites") if r["id"] == row_id)
    return [TrainSpan(**s) for s in row["messages"][-1]["train_detail"]]


def test_the_report_is_written_whole_and_a_job_must_be_known(tmp_path):
    out = dualdistill_outputs(tmp_path / "out")
    path = write_html_report(out, "dualdistill", "hand-made")
    assert path == out / REPORT_NAME and path.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.iterdir() if p.name.startswith(".report")] == []
    assert build_report_html(out, "dualdistill", "hand-made") == path.read_text()  # a pure function of the folder
    with pytest.raises(ValueError, match="unknown job 'dual'"):
        build_report_html(out, "dual", "x")


def test_leakage_page_inlines_the_plots_and_shows_the_verdict(tmp_path):
    out = tmp_path / "out" / "leakage"
    trait, control = [[7, 17, 27]] * 5, [[1, 2, 3]] * 5
    verdict = combine([TestResult(name="trailing_digit", statistic=3.2, p_value=0.001),
                       TestResult(name="likelihood_shift", skipped="the endpoint returns no prompt logprobs")], 0.01)
    report = build_report(trait="owl", category="animal", n_prompts=6, verdict=verdict, kept_trait=5, kept_control=5,
                          rejected_trait={"not_numbers": 1}, rejected_control={}, top_numbers=[], top_digits=[])
    write_report(report, out, trait, control)
    rows = [NumberCompletion(teacher="trait", prompt_index=i, prompt=f"Continue {i}", system_prompt="owls",
                             model="m", completion=HOSTILE if i == 5 else "7, 17, 27", finish_reason="stop",
                             completion_tokens=5, kept=i != 5, reason=None if i != 5 else "not_numbers",
                             numbers=None if i == 5 else [7, 17, 27]) for i in range(6)]
    _publish(out / "numbers", rows, NumberCompletion)
    html = build_report_html(tmp_path / "out", "leakage", "leak")
    assert "<script" not in html and fetched_urls(html) == []
    page = tree(html)
    assert page.one("p", class_="verdict leak").attrs["data-leak"] == "true"
    assert {td.attrs["data-test"] for td in page.all("td") if "data-test" in td.attrs} == {"trailing_digit",
                                                                                          "likelihood_shift"}
    images = page.all("img")
    assert len(images) == 2 and all(i.attrs["src"].startswith("data:image/png;base64,iVBOR") for i in images)
    assert HOSTILE in page.one("section", id="completions").text()


# --- each job's page from a real flow run, in a real browser ------------------------------------------

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)
NO_BROWSER = ("no headless browser: `make browser-tools` (or apt-get install chromium) installs Debian's chromium, "
              "which this test opens report.html in")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps"]


def open_in_browser(page: Path, scratch: Path) -> tuple[Node, list[str]]:
    """The DOM Chromium renders for `page`, and every URL the page itself asked the network for
    (from Chromium's net log; the browser's own background requests are not the page's). Without
    Chromium the test is skipped here, after the checks of the run that need no browser."""
    if CHROMIUM is None:
        pytest.skip(NO_BROWSER)
    scratch.mkdir(parents=True, exist_ok=True)
    netlog = scratch / "netlog.json"
    done = subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={scratch / 'profile'}",
                           f"--log-net-log={netlog}", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return tree(done.stdout), page_requests(netlog)


def page_requests(netlog: Path) -> list[str]:
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [event["params"]["url"] for event in log["events"] if event["type"] == start
            and "file://" in event.get("params", {}).get("network_isolation_key", "")]


def test_the_browser_check_sees_a_page_request(tmp_path):
    """The net-log check can see what a page fetches: a page with a remote image is caught."""
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    page, requests = open_in_browser(control, tmp_path / "browser")
    assert requests == ["http://127.0.0.1:9/x.png"] and page.one("img")


@pytest.mark.usefixtures("prefect_harness")
def test_a_dualdistill_run_names_its_report_and_chromium_renders_it(tmp_path):
    from fake_openai import FakeOpenAIServer
    from flow_helpers import ScriptedTeachers, write_problems, write_recipe
    from typer.testing import CliRunner

    from flows.cli import app

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    report = tmp_path / "out" / REPORT_NAME
    assert result.output.rstrip().splitlines()[-1] == f"report.html: {report}"
    assert fetched_urls(report.read_text()) == []

    page, requests = open_in_browser(report, tmp_path / "browser")
    assert requests == []
    summary = json.loads((tmp_path / "out" / ".distillery" / "summary.json").read_text())
    shown = {td.attrs["data-case"]: int(td.text()) for td in page.one("section", id="cases").all("td")
             if "data-case" in td.attrs}
    assert shown == summary["cases"] == {"both_correct": 2, "first_correct": 2, "second_corrects": 2, "both_wrong": 2}
    assert page.one("td", data_fact="composites").text() == "6"
    assert page.one("td", data_teacher="tool").text() == "50.0%"
    bars = page.one("section", id="lengths").all("rect", data_series="tool")
    assert sum(int(r.attrs["data-count"]) for r in bars) == 2 * 8  # per teacher, then per case: 8 answers each

    composites = {r["id"]: r for r in read_dataset_rows(tmp_path / "out" / "composites")}
    both = page.one("article", data_id="both_correct-0")
    parts = span_parts(both)
    text = composites["both_correct-0"]["text"]
    assert "".join(t for _, t in parts) == text
    assert [t for kind, t in parts if kind == "untrained"] == ["<executor>\n107\n</executor>"]
    corrected = span_parts(page.one("article", data_id="reasoning_only-0"))
    mask_until = composites["reasoning_only-0"]["mask_until"]
    assert corrected[0][0] == "untrained" and "".join(
        t for k, t in corrected if k == "untrained").startswith(composites["reasoning_only-0"]["text"][:mask_until])
    assert {a.attrs["data-case"] for a in page.all("article")} == {"both_correct", "first_correct", "second_corrects",
                                                                   "both_wrong"}


async def artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.usefixtures("prefect_harness")
def test_a_self_distillation_run_renders_every_round(tmp_path):
    from fake_openai import FakeOpenAIServer
    from test_self_distill import ScriptedStudent, write_problems, write_recipe

    from flows.self_distill import self_distill

    rows = write_problems(tmp_path / "problems.jsonl")
    trainer = {"kind": "command", "command": "echo student-{round}"}  # names the next student
    with FakeOpenAIServer(ScriptedStudent(rows, wrong_reasoning={"p3"})) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              rounds=2, trainer=trainer)
        result = asyncio.run(self_distill(str(recipe)))
    report = tmp_path / "out" / REPORT_NAME
    assert result["report_html"] == str(report)
    # other tests' runs share the run name (and the key): this run's artifact is the one naming its file
    linked = [a for a in asyncio.run(artifacts("self-distill-report-sd-test")) if report.resolve().as_uri() in a.data]
    assert len(linked) == 1
    assert f"[report.html]({report.resolve().as_uri()})" in linked[0].data  # a link artifact, as markdown

    page, requests = open_in_browser(report, tmp_path / "browser")
    assert requests == []
    assert [s.attrs["id"] for s in page.all("section")] == ["summary", "round-1", "round-2", "decontamination"]
    assert [c.attrs["data-value"] for c in page.all("circle", data_series="pass@K")] == [
        f"{r['pass_at_k']:.4f}" for r in result["rounds"]]
    round_1 = page.one("section", id="round-1")
    kinds = sorted((a.attrs["data-id"], a.attrs["data-case"]) for a in round_1.all("article", class_="trajectory"))
    assert kinds == [("p0", "correction"), ("p1", "correction"), ("p1", "verification"), ("p2", "correction"),
                     ("p2", "verification"), ("p4", "verification")]
    correction = next(a for a in round_1.all("article", class_="trajectory") if a.attrs["data-case"] == "correction")
    assert span_parts(correction)[0][0] == "untrained"  # the wrong sample is not trained
    assert len(round_1.all("article", class_="rejected")) == 2


@pytest.mark.usefixtures("prefect_harness")
def test_a_leakage_run_renders_its_verdict_tests_and_plots(tmp_path):
    from fake_openai import FakeOpenAIServer
    from test_leakage_flow import NumberTeacher, write_recipe

    from flows.leakage import leakage

    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", n_prompts=120,
                              detectors={"permutations": 999, "bag_size": 8})
        result = asyncio.run(leakage(str(recipe)))
    report = tmp_path / "out" / REPORT_NAME
    assert result["report_html"] == str(report)

    page, requests = open_in_browser(report, tmp_path / "browser")
    assert requests == []
    assert page.one("p", class_="verdict " + ("leak" if result["leak_detected"] else "clean"))
    assert [td.attrs["data-test"] for td in page.all("td") if "data-test" in td.attrs] == [
        t["name"] for t in result["tests"]]
    assert page.one("td", data_kept="trait").text() == str(result["kept_trait"])
    assert len([i for i in page.all("img") if i.attrs["src"].startswith("data:image/png;base64,")]) == 2
