"""Find the final answer in a tagged response (see `flows.grading` for the order and why)."""

from __future__ import annotations

import re

_HIDDEN_OPEN = re.compile(r"<(think|code|executor)>", re.IGNORECASE)
_HIDDEN_CLOSE = {
    tag: re.compile(f"</{tag}>", re.IGNORECASE) for tag in ("think", "code", "executor")
}
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_BOX_TOKEN = re.compile(r"[^\s$]+")
_BRACE_EVENTS = re.compile(r"\\.|[{}]", re.DOTALL)

NO_ANSWER = "no_answer: no <answer> tag and no \\boxed{} outside <think>/<code>/<executor>"


def extract_final_answer(text: str) -> tuple[str | None, str]:
    """The final answer of a tagged response and where it came from (see `flows.grading`)."""
    visible, unclosed = visible_text(text)
    blocks = _ANSWER_BLOCK.findall(visible)
    if blocks:
        boxed = _last_boxed(blocks[-1])
        if boxed is not None:
            return boxed, "answer_tag_boxed"
        if (math := _math_in_prose(blocks[-1])) is not None:
            return math, "answer_tag_math"
        return blocks[-1].strip(), "answer_tag"
    # An <answer> cut off by the length limit still counts through a complete \boxed{}.
    boxed = _last_boxed(visible)
    if boxed is not None:
        return boxed, "boxed_outside_reasoning"
    if unclosed:
        return None, f"truncated: unclosed <{unclosed}>"
    if _ANSWER_OPEN.search(visible):
        return None, "truncated: unclosed <answer> without \\boxed{}"
    return None, NO_ANSWER


def boxed_answers(text: str) -> list[str]:
    """Every complete `\\boxed{…}` where the final answer is read from: the last <answer>
    block when it has one, else the text outside reasoning and tool traffic."""
    visible, _ = visible_text(text)
    blocks = _ANSWER_BLOCK.findall(visible)
    region = blocks[-1] if blocks and _BOX.search(blocks[-1]) else visible
    found = []
    for match in _BOX.finditer(region):
        content = _box_content(region, match.end())
        if content is not None and content.strip():
            found.append(content.strip())
    return found


# `$…$`, `$$…$$`, `\\(…\\)`, `\\[…\\]`; an escaped `\\$` is a dollar sign, not a delimiter
_MATH_SPAN = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]",
                        re.DOTALL)
_WORD = re.compile(r"[A-Za-z]{2,}")


def _math_in_prose(block: str) -> str | None:
    """The last math span of an answer written as prose ("so $x \\le 3$."), else None."""
    spans = list(_MATH_SPAN.finditer(block))
    if not spans:
        return None
    prose = _MATH_SPAN.sub(" ", block)
    if not _WORD.search(prose):
        return None
    last = spans[-1]
    return next(group for group in last.groups() if group is not None).strip()


def visible_text(text: str) -> tuple[str, str | None]:
    """Text outside <think>, <code> and <executor> blocks, and the tag left unclosed."""
    pos = 0
    # Chat templates often put <think> in the prompt, so the response opens mid-thought.
    orphan = _HIDDEN_CLOSE["think"].search(text)
    if orphan and not _THINK_OPEN.search(text, 0, orphan.start()):
        pos = orphan.end()
    parts: list[str] = []
    while True:
        opening = _HIDDEN_OPEN.search(text, pos)
        if opening is None:
            parts.append(text[pos:])
            return "".join(parts), None
        parts.append(text[pos : opening.start()])
        tag = opening.group(1).lower()
        closing = _HIDDEN_CLOSE[tag].search(text, opening.end())
        if closing is None:
            return "".join(parts), tag
        pos = closing.end()


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` (or `\\boxed 5`) in text, stripped."""
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None:
            return content.strip()
    return None


def _box_content(text: str, start: int) -> str | None:
    if start >= len(text):
        return None
    if text[start] != "{":
        token = _BOX_TOKEN.match(text, start)
        return token.group() if token else None
    return _braced(text, start)


def _braced(text: str, start: int) -> str | None:
    """Content of the group opening at text[start] == "{"; None when never closed."""
    depth = 0
    for event in _BRACE_EVENTS.finditer(text, start):
        token = event.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : event.start()]
    return None
