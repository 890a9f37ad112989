"""Records that cross a stage boundary.

Each stage keeps every field it is given and adds its own, so a row in the final
dataset can be traced back to the problem, the teacher, the request and the grade.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TeacherRole = Literal["tool", "reasoning"]
CaseLabel = Literal["both_correct", "first_correct", "second_corrects", "both_wrong"]


class Problem(BaseModel):
    """One problem with its gold answer, as loaded from the problem source."""

    model_config = ConfigDict(frozen=True)

    id: str
    problem: str
    answer: str
    source: str = ""  # file or generator the problem came from
    source_row: int = 0  # 0-based row in that source, for error messages


class Verdict(BaseModel):
    """A grade: always the answer that was extracted and why it was judged so."""

    model_config = ConfigDict(frozen=True)

    correct: bool
    extracted: str | None
    reason: str


class Trajectory(BaseModel):
    """One teacher's full answer to one problem, normalised into the tag format."""

    problem_id: str
    teacher: TeacherRole
    model: str  # model name as sent (endpoint-independent)
    text: str  # <think>/<code>/<executor>/<answer> tagged text
    finish_reason: str  # of the last request: stop | length | tool_limit | ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0  # model requests this trajectory took
    replayed_requests: int = 0  # of which answered from the journal
    tool_calls: int = 0  # code executions (tool teacher only)
    tool_errors: int = 0  # executions that ended in an error or a timeout
    latency_s: float = 0.0  # summed model latency (excludes journal replays)


class GradedTrajectory(Trajectory):
    correct: bool
    extracted: str | None
    grade_reason: str


class Composite(BaseModel):
    """One stitched SFT example (see DESIGN.md, stitching rules)."""

    id: str
    problem: str
    answer: str
    first_teacher: TeacherRole
    second_teacher: TeacherRole
    g1: bool
    g2: bool
    case: CaseLabel
    transition: str  # the phrase between the two answers ("" when there is none)
    text: str
    messages: list[dict[str, str]]
    mask_until: int = Field(ge=0)  # leading characters of `text` to mask from the loss
    first_model: str
    second_model: str


class Rejected(BaseModel):
    """A pair that was dropped, kept with the reason."""

    id: str
    problem: str
    answer: str
    first_teacher: TeacherRole
    g1: bool
    g2: bool
    case: CaseLabel
    reason: str
    first_text: str
    second_text: str
    first_extracted: str | None
    second_extracted: str | None
