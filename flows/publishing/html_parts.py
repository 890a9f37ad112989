"""The pieces `report.html` is built from: escaping, tables, inline SVG charts, trained spans.

Everything here returns `Html` (a `str` that is already safe markup); anything else that
reaches a piece is escaped, so model text can never become markup. The page carries its CSS
inline and a Content-Security-Policy that forbids every fetch (images are `data:` URIs), so
it opens offline and a stray URL in it could not load anyway. No JavaScript.

    from flows.publishing.html_parts import histogram, page, spans, table
    page("run demo", "DualDistill", [("cases", "Cases", table(["case", "pairs"], rows))])
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SHOWN_CHARS = 20_000  # of one message, in a trajectory sample; the rest is counted, not shown
SERIES = 6  # distinct series colours (.s0 … .s5); more series reuse them


class Html(str):
    """Markup that is safe as it is (built here, with every value escaped). Adding text to it
    escapes the text: `Html + str` is `Html`."""

    def __add__(self, other: Any) -> Html:
        return Html(str.__add__(self, esc(other)))

    def __radd__(self, other: Any) -> Html:
        return Html(str.__add__(esc(other), self))


class Cell(Html):
    """A whole table cell (`cell(...)`), for a cell with attributes."""


def esc(value: Any) -> Html:
    """`value` as text in a page: escaped, unless it is already `Html`; None is empty."""
    if isinstance(value, Html):
        return value
    return Html("" if value is None else html.escape(str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(part) for part in parts))


def tag(name: str, body: Any = "", **attrs: Any) -> Html:
    """`<name attrs>body</name>`; `class_` gives `class`, `data_x` gives `data-x`; None drops an attribute."""
    rendered = "".join(f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"' for key, value in attrs.items()
                       if value is not None)
    return Html(f"<{name}{rendered}>{esc(body)}</{name}>")


def cell(body: Any, **attrs: Any) -> Cell:
    """A table cell with attributes (`data_case="both_correct"`); numbers are right-aligned."""
    if isinstance(body, (int, float)) and not isinstance(body, bool):
        attrs.setdefault("class_", "num")
    return Cell(tag("td", body, **attrs))


def table(headers: Sequence[Any] | None, rows: Iterable[Sequence[Any]], *, class_: str | None = None,
          empty: str = "Nothing to show.") -> Html:
    """A table (no header row with `headers` None); a cell is a `cell(...)` or any value (escaped)."""
    body = [tag("tr", join(c if isinstance(c, Cell) else cell(c) for c in row)) for row in rows]
    if not body:
        return tag("p", empty, class_="empty")
    head = tag("thead", tag("tr", join(tag("th", h) for h in headers))) if headers else Html("")
    return tag("table", head + tag("tbody", join(body)), class_=class_)


def prose(text: str, class_: str = "note") -> Html:
    """A paragraph of our own text, `code` in backticks shown as code."""
    return tag("p", Html(re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))), class_=class_)


def pre(text: Any, class_: str | None = None) -> Html:
    return tag("pre", text, class_=class_)


def details(summary: Any, body: Any, *, open_: bool = False, **attrs: Any) -> Html:
    return tag("details", tag("summary", summary) + esc(body), open="" if open_ else None, **attrs)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def png(path: Path, alt: str) -> Html:
    """A PNG file inlined as a `data:` URI (nothing to fetch when the page opens)."""
    if not path.is_file():
        return tag("p", f"{path.name}: not written by this run", class_="empty")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return Html(f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">')


# --- trained and untrained spans ---------------------------------------------------------------


def spans(content: str, train_detail: Sequence[Mapping[str, Any]] | None, *, limit: int = SHOWN_CHARS) -> Html:
    """A message's content with each `train_detail` span marked trained or not (Axolotl's format:
    `end_offset` inclusive). Without spans the content is shown plain (a prompt turn). Characters
    no span covers are marked `gap` (a broken row would show them); past `limit` they are counted."""
    if not train_detail:
        return pre(_clipped(content, limit), class_="turn")
    parts, position = [], 0
    for span in sorted(train_detail, key=lambda s: s["begin_offset"]):
        begin, end = span["begin_offset"], span["end_offset"] + 1
        if begin > position:
            parts.append(_span(content, position, begin, "gap", limit))
        parts.append(_span(content, begin, end, "trained" if span["train"] else "untrained", limit))
        position = max(position, end)
    if position < len(content):
        parts.append(_span(content, position, len(content), "gap", limit))
    more = len(content) - limit
    note = tag("span", f"\n… {more} more characters not shown here", class_="more") if more > 0 else ""
    return tag("pre", join(parts) + note, class_="turn")


_SPAN_TITLES = {"trained": "trained on", "untrained": "not trained (masked from the loss)",
                "gap": "covered by no train_detail span"}


def _span(content: str, begin: int, end: int, kind: str, limit: int) -> Html:
    shown = content[begin:min(end, limit)]
    if not shown:
        return Html("")
    return tag("span", shown, class_=f"span {kind}", title=_SPAN_TITLES[kind], data_train=kind,
               data_begin=begin, data_end=end - 1)


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}\n… {len(text) - limit} more characters not shown here"


def span_counts(content: str, train_detail: Sequence[Mapping[str, Any]] | None) -> tuple[int, int]:
    """(trained, untrained) characters of a message."""
    if not train_detail:
        return 0, len(content)
    trained = sum(s["end_offset"] + 1 - s["begin_offset"] for s in train_detail if s["train"])
    return trained, len(content) - trained


# --- charts (inline SVG) -------------------------------------------------------------------------


def bin_edges(values: Iterable[int], bins: int = 20) -> list[int]:
    """Edges of `bins` equal integer bins of a round width covering 0 … max(values)."""
    top = max(values, default=0)
    raw = max(1.0, (top + 1) / bins)
    magnitude = 10 ** math.floor(math.log10(raw))
    width = next(int(step * magnitude) for step in (1, 2, 5, 10) if step * magnitude >= raw)
    return [width * i for i in range(math.ceil((top + 1) / width) + 1)]


def counts_in(values: Iterable[int], edges: Sequence[int]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    width = edges[1] - edges[0]
    for value in values:
        counts[min(max(value, 0) // width, len(counts) - 1)] += 1
    return counts


def histogram(series: Mapping[str, Sequence[int]], edges: Sequence[int], *, label: str, unit: str = "tokens",
              what: str = "answers", width: int = 520, height: int = 200) -> Html:
    """Grouped bars: per bin, one bar per series; every bar carries its count (and a tooltip)."""
    if not any(series.values()):
        return tag("p", f"{label}: no {what}.", class_="empty")
    counts = {name: counts_in(values, edges) for name, values in series.items()}
    top = max(max(c, default=0) for c in counts.values()) or 1
    left, bottom, plot_w, plot_h = 44, 34, width - 54, height - 60
    slot = plot_w / (len(edges) - 1)
    bar = max(1.0, (slot - 2) / len(series))
    parts = [_axes(left, bottom, plot_w, plot_h, height, top, label)]
    for i in range(len(edges) - 1):
        for j, (name, values) in enumerate(counts.items()):
            h = plot_h * values[i] / top
            x, y = left + i * slot + 1 + j * bar, height - bottom - h
            tip = f"{name}: {edges[i]}–{edges[i + 1] - 1} {unit}: {values[i]} {what}"
            parts.append(tag("rect", tag("title", tip), class_=f"bar s{j % SERIES}", x=f"{x:.1f}", y=f"{y:.1f}",
                             width=f"{bar:.1f}", height=f"{h:.1f}", data_series=name, data_bin=edges[i],
                             data_count=values[i]))
    step = max(1, math.ceil((len(edges) - 1) / 8))
    for i in range(0, len(edges), step):
        parts.append(tag("text", edges[i], x=f"{left + i * slot:.1f}", y=height - bottom + 14, class_="tick",
                         text_anchor="middle"))
    parts.append(tag("text", unit, x=left + plot_w, y=height - 4, class_="axis", text_anchor="end"))
    parts.append(_legend(list(series), left + 8, 14))
    return _svg(parts, width, height, label)


def line_chart(xs: Sequence[int], series: Mapping[str, Sequence[float]], *, label: str, x_label: str = "round",
               width: int = 520, height: int = 220) -> Html:
    """Values 0–1 per x (e.g. accuracy per round), one polyline with labelled points per series."""
    if not xs:
        return tag("p", f"{label}: nothing to plot.", class_="empty")
    left, bottom, plot_w, plot_h = 44, 34, width - 64, height - 64
    at = (lambda i: left + (plot_w * i / (len(xs) - 1) if len(xs) > 1 else plot_w / 2))
    y_of = (lambda v: height - bottom - plot_h * max(0.0, min(1.0, v)))
    parts = [_axes(left, bottom, plot_w, plot_h, height, 1.0, label)]
    for j, (name, values) in enumerate(series.items()):
        points = " ".join(f"{at(i):.1f},{y_of(v):.1f}" for i, v in enumerate(values))
        parts.append(tag("polyline", "", points=points, class_=f"line s{j % SERIES}"))
        for i, value in enumerate(values):
            parts.append(tag("circle", tag("title", f"{name}, {x_label} {xs[i]}: {value:.3f}"), class_=f"dot s{j % SERIES}",
                             cx=f"{at(i):.1f}", cy=f"{y_of(value):.1f}", r=4, data_series=name, data_x=xs[i],
                             data_value=f"{value:.4f}"))
    for i, x in enumerate(xs):
        parts.append(tag("text", x, x=f"{at(i):.1f}", y=height - bottom + 14, class_="tick", text_anchor="middle"))
    parts.append(tag("text", x_label, x=left + plot_w, y=height - 4, class_="axis", text_anchor="end"))
    parts.append(_legend(list(series), left + 8, 14))
    return _svg(parts, width, height, label)


def bars(items: Sequence[tuple[str, float, str]], *, label: str, width: int = 520) -> Html:
    """Horizontal bars (label, value 0–1, text shown after the bar), e.g. accuracy per teacher."""
    if not items:
        return tag("p", f"{label}: nothing to plot.", class_="empty")
    row, name_w, bar_w = 26, 150, width - 260
    parts = []
    for i, (name, value, text) in enumerate(items):
        y = 6 + i * row
        parts.append(tag("text", name, x=name_w - 8, y=y + 15, class_="tick", text_anchor="end"))
        parts.append(tag("rect", "", x=name_w, y=y, width=bar_w, height=row - 8, class_="track"))
        parts.append(tag("rect", tag("title", f"{name}: {text}"), x=name_w, y=y,
                         width=f"{bar_w * max(0.0, min(1.0, value)):.1f}", height=row - 8, class_=f"bar s{i % SERIES}",
                         data_label=name, data_value=f"{value:.4f}"))
        parts.append(tag("text", text, x=name_w + bar_w + 8, y=y + 15, class_="tick"))
    return _svg(parts, width, 12 + row * len(items), label)


def _axes(left: int, bottom: int, plot_w: float, plot_h: float, height: int, top: float, label: str) -> Html:
    base = height - bottom
    ticks = [0, top / 2, top] if top != 1 else [0, 0.5, 1]
    parts = [tag("line", "", x1=left, y1=base, x2=left + plot_w, y2=base, class_="axis-line"),
             tag("line", "", x1=left, y1=base - plot_h, x2=left, y2=base, class_="axis-line")]
    for value in ticks:
        y = base - plot_h * (value / top if top else 0)
        text = f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"
        parts.append(tag("line", "", x1=left, y1=f"{y:.1f}", x2=left + plot_w, y2=f"{y:.1f}", class_="grid"))
        parts.append(tag("text", text, x=left - 6, y=f"{y + 4:.1f}", class_="tick", text_anchor="end"))
    return join(parts)


def _legend(names: Sequence[str], x: int, y: int) -> Html:
    parts, offset = [], 0
    for j, name in enumerate(names):
        parts.append(tag("rect", "", x=x + offset, y=y - 9, width=10, height=10, class_=f"bar s{j % SERIES}"))
        parts.append(tag("text", name, x=x + offset + 14, y=y, class_="legend"))
        offset += 24 + 7 * len(name)
    return join(parts)


def _svg(parts: list[Html], width: int, height: float, label: str) -> Html:
    return tag("figure", tag("svg", join(parts), class_="chart", role="img",
                             viewBox=f"0 0 {width} {height:.0f}", width=width, height=f"{height:.0f}",
                             aria_label=label) + tag("figcaption", label))


# --- the page -------------------------------------------------------------------------------------

# Nothing may be fetched: styles are inline, images data: URIs, and there is no script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#fafbfc}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1e0}nav{padding:8px 28px;background:#eef1f6;position:sticky;top:0;
border-bottom:1px solid #d5dbe5}nav a{margin-right:14px;color:#2456a6;text-decoration:none;white-space:nowrap}
main{max-width:1150px;padding:8px 28px 60px}section{margin-top:26px}h2{border-bottom:2px solid #d5dbe5;
padding-bottom:4px}h3{margin:18px 0 6px}table{border-collapse:collapse;margin:8px 0}
table{display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #d5dbe5;padding:4px 9px;text-align:left;vertical-align:top;background:#fff}th{background:#eef1f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}.empty{color:#6b7385;font-style:italic}
.note{color:#4b5366}figure{margin:10px 0}figcaption{color:#4b5366;font-size:13px}svg.chart{background:#fff;
border:1px solid #d5dbe5}svg .tick,svg .legend,svg .axis{font-size:11px;fill:#4b5366}svg .grid{stroke:#eceff4}
svg .axis-line{stroke:#8a93a6}svg .track{fill:#eef1f6}.s0{fill:#3b6fd8;stroke:#3b6fd8}.s1{fill:#e07b39;
stroke:#e07b39}.s2{fill:#3aa564;stroke:#3aa564}.s3{fill:#b0479e;stroke:#b0479e}.s4{fill:#8a6d3b;
stroke:#8a6d3b}.s5{fill:#4b5366;stroke:#4b5366}svg .line{fill:none;stroke-width:2}
.grid2{display:flex;flex-wrap:wrap;gap:12px}pre{white-space:pre-wrap;word-break:break-word;background:#fff;
border:1px solid #d5dbe5;padding:8px;margin:4px 0;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace;
max-height:520px;overflow:auto}.span.trained{background:#e3f4e6}.span.untrained{color:#7a4b00;
background:repeating-linear-gradient(135deg,#fff3dc 0 6px,#fde8c4 6px 12px);text-decoration:line-through
rgba(122,75,0,.35)}.span.gap{background:#fdd}.more{color:#6b7385}.legend-box{display:inline-block;
padding:1px 8px;margin-right:8px;border:1px solid #d5dbe5}details{margin:8px 0;background:#fff;
border:1px solid #d5dbe5;padding:4px 10px}summary{cursor:pointer;font-weight:600}.role{font-size:12px;
color:#4b5366;text-transform:uppercase;margin-top:6px}.verdict{font-size:18px;padding:10px 14px;
border-radius:4px}.verdict.leak{background:#fde2e1}.verdict.clean{background:#e3f4e6}
img.plot{max-width:100%;border:1px solid #d5dbe5;background:#fff}
"""

LEGEND = Html('<p><span class="legend-box span trained">trained on</span>'
              '<span class="legend-box span untrained">not trained (masked from the loss)</span>'
              '<span class="note">spans from each assistant turn\'s <code>train_detail</code></span></p>')


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, Html]]) -> str:
    """A whole self-contained page: header, a link per section, the sections."""
    nav = join(tag("a", heading, href=f"#{anchor}") for anchor, heading, _ in sections)
    body = join(tag("section", tag("h2", heading) + body, id=anchor) for anchor, heading, body in sections)
    return str(Html("<!DOCTYPE html>\n")
               + tag("html", tag("head", Html('<meta charset="utf-8">')
                              + Html(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">')
                              + Html('<meta name="viewport" content="width=device-width, initial-scale=1">')
                              + tag("title", title) + tag("style", Html(CSS)))
                  + tag("body", tag("header", tag("h1", title) + tag("p", subtitle)) + tag("nav", nav)
                        + tag("main", body)), lang="en")
               + Html("\n"))
