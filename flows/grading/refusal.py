"""Responses with nothing to grade: empty, blank, or a refusal that gives no answer.

A teacher that answers with a well-formed but unusable completion has answered: the run
keeps it and grades it wrong as `empty_answer` (flows/grading/compare.py), rather than
asking again for what the same seed gives back. A refusal counts only when it is short,
opens with an apology or a "can't", and holds no `<answer>` or `\\boxed{}`: a long
solution that begins "Sorry, let me redo that" is graded as usual.
"""

from __future__ import annotations

import re

_REFUSAL = re.compile(
    r"^\s*(?:i[’']?m sorry|i am sorry|sorry|i apologi[sz]e|i can(?:[’']?t|not)|i won[’']?t"
    r"|i am (?:not able|unable)|i[’']?m (?:not able|unable)|as an ai)\b",
    re.IGNORECASE,
)
_MAX_REFUSAL_CHARS = 400


def empty_reason(response: str) -> str | None:
    """`empty_answer: …` when the response has nothing to grade, else None."""
    if not response.strip():
        return "empty_answer: the response is empty"
    if len(response) <= _MAX_REFUSAL_CHARS and _REFUSAL.match(response) and not _has_answer(response):
        return "empty_answer: a refusal with no answer"
    return None


def _has_answer(response: str) -> bool:
    return "<answer>" in response or "\\boxed" in response
