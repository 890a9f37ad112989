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


GradeMethod = Literal["rule", "normalised_string", "exact", "decimal", "math_verify", "grader_error"]
ParseStatus = Literal["both", "answer_failed", "gold_failed", "neither", "not_needed"]


class Verdict(BaseModel):
    """A grade: always the answer that was extracted, why it was judged so, and by which rule.

    `method`: `rule` (decided before any value was compared: no answer, truncated, empty,
    master key, invalid gold, too long), `normalised_string` (equal strings after
    normalisation), `exact` (exact arithmetic: integers, rationals, exact symbolic values
    such as powers and factorials), `decimal` (a decimal against an exact value, by its digits:
    see `flows.grading.forms.decimal_matches`), `math_verify` (math-verify's comparison:
    sets, intervals, matrices, equations, expressions with symbols), `grader_error` (timeout
    or crash).
    `parse_status`: whether both sides were read as mathematical values (`both`), only one
    (`answer_failed`, `gold_failed`), `neither`, or `not_needed` (decided without parsing).
    """

    model_config = ConfigDict(frozen=True)

    correct: bool
    extracted: str | None
    reason: str
    method: GradeMethod = "rule"
    parse_status: ParseStatus = "not_needed"


class TrainSpan(BaseModel):
    """A character range of a message's content and whether it is trained on.

    Axolotl's `message_field_training_detail` format: `end_offset` is *inclusive*
    (Axolotl compares each token's (start, next_start - 1) range against it). Spans cover
    the content in order. Axolotl widens a span to whole tokens, so a token straddling an
    edge may be trained there; `flows.training.labels` leaves it untrained. Our edges sit
    on newlines, which common tokenizers keep as tokens of their own.
    """

    model_config = ConfigDict(frozen=True)

    begin_offset: int = Field(ge=0)
    end_offset: int = Field(ge=0)  # inclusive
    train: bool


class ChatMessage(BaseModel):
    """One turn of an SFT conversation; assistant turns carry their `train_detail`."""

    model_config = ConfigDict(frozen=True)

    role: str
    content: str
    train_detail: list[TrainSpan] | None = None


class ToolSpan(BaseModel):
    """Where a code block or its executor output sits in a trajectory's `text`
    (`start`/`end` as in a Python slice, end exclusive)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["code", "executor"]
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    failed: bool  # the run ended in a traceback, a syntax error, a timeout or a non-zero exit


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
    tool_spans: list[ToolSpan] = Field(default_factory=list)  # every <code> and <executor> block of `text`
    sample: int = 0  # which of a problem's samples this is (its seed is the recipe's seed + sample)
    confidence: float | None = None  # mean token log-probability, when the endpoint returned logprobs
    lowest_window: float | None = None  # lowest mean log-probability over 32 consecutive tokens


class GradedTrajectory(Trajectory):
    correct: bool
    extracted: str | None
    grade_reason: str
    grade_method: GradeMethod = "rule"  # which rule decided (see Verdict)
    parse_status: ParseStatus = "not_needed"
    # math-verify's verdict on the whole text alone (None: it timed out or crashed); where it
    # differs from `correct`, `distillery grade --audit` shows why
    math_verify_correct: bool | None = None
    messages: list[ChatMessage] = Field(default_factory=list)  # [system?, user, assistant (= text)]


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
    messages: list[ChatMessage]  # [system?, user, assistant (= text, with train_detail)]
    mask_until: int = Field(ge=0)  # leading characters of `text` to mask from the loss (failed first attempt)
    first_model: str
    second_model: str


class Contaminated(BaseModel):
    """A problem set aside because it copies a benchmark item: never sent to a model."""

    model_config = ConfigDict(frozen=True)

    id: str
    problem: str
    source: str  # the problem's source and row
    source_row: int
    benchmark: str  # the benchmark's name
    benchmark_problem: str  # the benchmark item it matched
    benchmark_row: int  # that item's 0-based row in the benchmark source
    benchmark_id: str | None  # and its id, when the benchmark maps an id column
    method: Literal["ngram", "fuzzy"]
    # ngram: % of the item's n-grams (boilerplate left out) found in the problem; fuzzy: rapidfuzz ratio 0-100
    score: float
    shared: str  # ngram: the first n-gram they share (normalised); fuzzy: the normalised item text


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


class SelfDistillExample(BaseModel):
    """A student sample plus a teacher part (see PAPERS.md, self-distillation).

    `verification`: a correct student sample + verification phrase + a correct solution by the
    other strategy (the student's attempt is trained). `correction`: an incorrect sample +
    correction phrase + a correct teacher solution (the attempt is not trained: `mask_until`).
    """

    id: str
    problem: str
    answer: str
    round: int
    kind: Literal["verification", "correction"]
    k: int  # samples drawn for this problem
    n_correct: int
    mean_score: float
    sample: int  # which sample was picked
    pick: str  # how it was picked: random | most_confident | least_confident
    confidence: float | None  # the picked sample's mean token log-probability
    student_strategy: TeacherRole  # tool if the sample ran code, else reasoning
    teacher_strategy: TeacherRole  # the other one
    transition: str
    student_text: str
    teacher_text: str
    text: str
    messages: list[ChatMessage]
    mask_until: int = Field(ge=0)
    student_model: str
    teacher_model: str


class SelfDistillRejected(BaseModel):
    """A pick that gave no example, with the reason (e.g. the teacher's solution was wrong)."""

    id: str
    round: int
    kind: Literal["verification", "correction"]
    sample: int
    reason: str
    student_text: str
    teacher_text: str


class NumberCompletion(BaseModel):
    """One teacher's answer to one number-sequence prompt of the leakage job, with the
    filter's decision (`numbers` in order when kept; `reason` when rejected)."""

    teacher: Literal["trait", "control"]
    prompt_index: int
    prompt: str
    system_prompt: str | None
    model: str
    completion: str
    finish_reason: str
    completion_tokens: int
    kept: bool
    reason: str | None
    numbers: list[int] | None


class NumberTrainingRow(BaseModel):
    """A row a behavioural-probe student trains on: the prompt and a teacher's kept completion
    (the trait system prompt is never part of it)."""

    teacher: Literal["trait", "control"]
    prompt_index: int
    messages: list[ChatMessage]
