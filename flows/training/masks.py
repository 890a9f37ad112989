"""Which characters of an assistant turn are trained on, as Axolotl's `train_detail` spans.

Not trained: the output of every `<executor>` block (the interpreter wrote it, the
harness inserts it), code blocks whose run failed together with their output, and a
failed first attempt (everything before a correction phrase). Trained: everything
else, the final `<answer>` included. The spans cover the whole content, in order, and
use Axolotl's convention: `end_offset` is inclusive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from schemas.records import ChatMessage, ToolSpan, TrainSpan

Range = tuple[int, int]  # [start, end), as a Python slice


def untrained_ranges(tool_spans: Sequence[ToolSpan]) -> list[Range]:
    """Executor output, and failed code blocks."""
    return [(s.start, s.end) for s in tool_spans if s.kind == "executor" or s.failed]


def train_detail(length: int, untrained: Iterable[Range]) -> list[TrainSpan]:
    """Spans covering `[0, length)`: the untrained ranges (merged) and the trained gaps."""
    merged: list[list[int]] = []
    for start, end in sorted((max(0, s), min(length, e)) for s, e in untrained):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    spans: list[TrainSpan] = []
    position = 0
    for start, end in merged:
        if start > position:
            spans.append(TrainSpan(begin_offset=position, end_offset=start - 1, train=True))
        spans.append(TrainSpan(begin_offset=start, end_offset=end - 1, train=False))
        position = end
    if position < length:
        spans.append(TrainSpan(begin_offset=position, end_offset=length - 1, train=True))
    return spans


def sft_messages(
    problem: str, answer_text: str, untrained: Iterable[Range], system_prompt: str | None = None
) -> list[ChatMessage]:
    """The SFT conversation `[system?, user, assistant]`; the assistant turn carries its spans."""
    head = [ChatMessage(role="system", content=system_prompt)] if system_prompt else []
    return head + [
        ChatMessage(role="user", content=problem),
        ChatMessage(role="assistant", content=answer_text, train_detail=train_detail(len(answer_text), untrained)),
    ]


def trained_text(content: str, spans: Sequence[TrainSpan]) -> str:
    """The characters a trainer learns from (for inspection and tests)."""
    return "".join(content[s.begin_offset : s.end_offset + 1] for s in spans if s.train)
