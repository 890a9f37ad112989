"""Grade teacher answers against gold answers.

In: a teacher's tagged response text and the problem's gold answer.
Out: a `Verdict` — correct or not, the answer that was extracted, and a reason whose
snake_case prefix can be grepped (`no_answer`, `truncated`, `empty_answer`,
`master_key`, `equal_after_normalisation`, `equivalent`, `not_equivalent`,
`grader_timeout`, ...).
Run: `distillery grade FILE.jsonl` (see `grade_jsonl`).

Extraction order, and why
-------------------------
1. Reasoning and tool traffic are cut away first: `<think>…</think>`, `<code>…</code>`
   and `<executor>…</executor>`. A `<think>` left unclosed (a generation cut off by the
   length limit) hides everything after it. A value that only appears in reasoning or in
   program output is not an answer: grading it would reward mentioning the gold.
2. The last `<answer>…</answer>` block: its last `\\boxed{}` if it has one, else its
   whole stripped content.
3. Otherwise the last `\\boxed{}` left in the visible text.
4. Otherwise there is no answer, and the verdict is wrong.

Comparison, and why
-------------------
The reference code counted an answer as correct when the gold was a *substring* of it
(gold "1" matched "10"). Here the extracted answer is compared as a whole value:

- An empty answer, or a "master key" — an empty opener such as "Let's solve this step
  by step.", "Solution" or a lone ":" that fools LLM judges — is wrong before anything
  is compared: an answer must be a mathematical value.
- Both sides are normalised (thousands separators, leading zeros, units, `\\$`, `%`,
  `\\dfrac`, `x = …`, surrounding `$`, trailing period); equal strings are correct.
- Integers and fractions are compared exactly as rationals.
- Everything else goes to math-verify (sympy). Its own timeouts use `signal.alarm`,
  which fails outside the main thread, so they are switched off: `grade` is safe in any
  thread but unbounded in time, and `Grader` bounds it by running math-verify in worker
  processes that it kills and restarts when one answer takes too long.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib.metadata import version
from multiprocessing.connection import Connection, wait
from typing import Any

from schemas.records import Verdict

GRADER_VERSION = f"distillery-grader/1 + math-verify {version('math-verify')}"

# (equivalent or None when no result came back, note or reason)
Outcome = tuple[bool | None, str]
Equivalence = Callable[[str, str], Outcome]
Key = tuple[str, str]  # (normalised answer, normalised gold)


class GradeInputError(ValueError):
    """A grading input row that cannot be graded; the message names source, line, field."""


# --------------------------------------------------------------------------- extraction

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
    """The final answer of a tagged response and where it came from (see module doc)."""
    visible, unclosed = _visible_text(text)
    blocks = _ANSWER_BLOCK.findall(visible)
    if blocks:
        boxed = _last_boxed(blocks[-1])
        if boxed is not None:
            return boxed, "answer_tag_boxed"
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


def _visible_text(text: str) -> tuple[str, str | None]:
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


# ------------------------------------------------------------------------ normalisation

_MASTER_KEY = re.compile(
    r"""^(?:
        let['’]?s\b.* | let\s+us\b.*                   # "Let's solve this step by step."
      | (?:the\s+)?(?:final\s+)?(?:solution|answer)(?:\s+is)?
      | step(?:\s*\d+)? | i\s+think | thinking | thought | reasoning | analysis
      | okay | ok | hmm+ | well | first(?:ly)? | sure
    )[\s.:;,!?]*$""",
    re.IGNORECASE | re.VERBOSE,
)
_PUNCTUATION_ONLY = re.compile(r"""^[\s.:;,!?\-–—*#'"`()\[\]{}]*$""")
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence),?\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*",
    re.IGNORECASE,
)
_OUTER_MATH = [
    re.compile(pattern, re.DOTALL)
    for pattern in (r"^\$\$(.*)\$\$$", r"^\$(.*)\$$", r"^\\\((.*)\\\)$", r"^\\\[(.*)\\\]$")
]
_WHOLE_GROUP = re.compile(r"^\\(boxed|fbox|text|textrm|textbf|mbox|mathrm|mathbf)\s*(?=\{)")
_REPLACEMENTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),  # \frac12
    (re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])\s*"), ""),
    (re.compile(r"\\(?:displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\!"), ""),
    (re.compile(r"\\[,:; ]|\\quad|\\qquad|~"), " "),
    (re.compile(r"\\?\$"), ""),
    (re.compile(r"\\?%|\\percent(?![A-Za-z])"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"[−–]"), "-"),
]
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=\S)\s*\\(?:(?:text|textrm|mbox)\s*\{\s*[A-Za-z][A-Za-z\s.]*"
    r"|mathrm\s*\{\s*[A-Za-z]{2,}[A-Za-z\s.]*)\}"  # \mathrm{i} is the imaginary unit
    r"\s*(?:\^\s*\{?\d\}?)?$"
)
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\d+/\d+|\\frac\{\d+\}\{\d+\})"
_MATH_WORDS = r"(?:pi|sqrt|inf|infinity|ln|log|exp|sin|cos|tan|mod|and|or|to|times|over)\b"
_TRAILING_UNIT_WORDS = re.compile(
    rf"^({_NUMBER})\s+(?!{_MATH_WORDS})(?:[A-Za-z]{{2,}}\b\.?\s*){{1,3}}(?:\^\s*\{{?\d\}}?)?$"
)
_ASSIGNMENT = re.compile(r"^\\?[A-Za-z]+(?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_LEADING_ZEROS = re.compile(r"(?<![\w.])0+(?=\d)")
_SPACE_AROUND_SYMBOL = re.compile(r"\s*([=+\-*/^_{}()\[\],<>|])\s*")


def master_key(answer: str) -> str | None:
    """Why answer is an empty opener rather than a value, or None when it is not one."""
    stripped = answer.strip()
    if stripped and _PUNCTUATION_ONLY.match(stripped):
        return f"punctuation only {stripped[:20]!r}"
    if _MASTER_KEY.match(stripped):
        return f"opener {stripped[:40]!r}"
    return None


@lru_cache(maxsize=65536)
def normalise(answer: str) -> str:
    """A canonical string for an answer, so that equal values usually compare equal.

    Thousands separators go only when every group has three digits and no space
    follows the comma ("12,345" -> "12345"); other commas separate list items and are
    written ", " ("1,2" and "1, 2" -> "1, 2"; "12, 345" stays a two-item list).
    """
    text = _ANSWER_PREFIX.sub("", answer.strip())
    for _ in range(3):
        before = text
        text = _unwrap(text)
        for pattern, replacement in _REPLACEMENTS:
            text = pattern.sub(replacement, text)
        text = " ".join(text.split())
        text = _strip_units(text)
        if match := _ASSIGNMENT.match(text):
            text = match.group(1).strip()
        if text == before:
            break
    if _THOUSANDS.match(text):
        text = text.replace(",", "").replace(" ", "")
    text = _LEADING_ZEROS.sub("", text).removeprefix("+")
    text = _SPACE_AROUND_SYMBOL.sub(r"\1", text)
    return text.replace(",", ", ")


def _unwrap(text: str) -> str:
    """Remove what wraps the whole answer: $…$, \\(…\\), \\boxed{…}, \\text{…}, a period."""
    while True:
        before = text
        text = text.strip()
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        for pattern in _OUTER_MATH:
            if match := pattern.match(text):
                text = match.group(1).strip()
        if match := _WHOLE_GROUP.match(text):
            inner = _braced(text, match.end())
            if inner is not None and match.end() + len(inner) + 2 == len(text):
                text = inner.strip()
        if text == before:
            return text


def _strip_units(text: str) -> str:
    """Drop a trailing unit: `5 \\text{ cm}`, `5 \\mathrm{kg}`, `12 square feet`, `3 cm^2`."""
    if any(ch.isdigit() for ch in text):
        text = _TRAILING_TEXT_UNIT.sub("", text)
    if match := _TRAILING_UNIT_WORDS.match(text):
        text = match.group(1)
    return text


_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?(?:\d+\.\d*|\.\d+)")
_SLASH = re.compile(r"(-?\d+)/(\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_MAX_EXACT_DIGITS = 1000  # int() refuses very long strings; those go to math-verify


def as_rational(text: str) -> tuple[Fraction, bool] | None:
    """An integer, decimal or simple fraction as an exact value, and whether it is a decimal."""
    if len(text) > _MAX_EXACT_DIGITS:
        return None
    if _INTEGER.fullmatch(text):
        return Fraction(int(text)), False
    if _DECIMAL.fullmatch(text):
        return Fraction(text), True
    if match := _SLASH.fullmatch(text):
        numerator, denominator = int(match.group(1)), int(match.group(2))
    elif match := _FRAC.fullmatch(text):
        sign = -1 if match.group(1) else 1
        numerator, denominator = sign * int(match.group(2)), int(match.group(3))
    else:
        return None
    return (Fraction(numerator, denominator), False) if denominator else None


# ---------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class _Check:
    """A comparison the cheap rules could not settle; math-verify decides it."""

    extracted: str
    answer: str  # normalised
    gold: str  # normalised

    @property
    def key(self) -> Key:
        return self.answer, self.gold


def _wrong(extracted: str | None, reason: str) -> Verdict:
    return Verdict(correct=False, extracted=extracted, reason=reason)


def _right(extracted: str, reason: str) -> Verdict:
    return Verdict(correct=True, extracted=extracted, reason=reason)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# sympy's time grows quickly with length; a value longer than this is prose, not an answer.
_MAX_SYMBOLIC_CHARS = 500


def _prepare(response: str, gold: str) -> Verdict | _Check:
    """Everything short of sympy: extraction, rejections, normalised and exact comparison."""
    extracted, how = extract_final_answer(response)
    if extracted is None:
        return _wrong(None, how)
    if not extracted.strip():
        return _wrong(extracted, "empty_answer")
    if opener := master_key(extracted):
        return _wrong(extracted, f"master_key: {opener}")
    answer = normalise(extracted)
    if not answer:
        return _wrong(extracted, "empty_answer: nothing left after normalisation")
    if opener := master_key(answer):
        return _wrong(extracted, f"master_key: {opener}")
    expected = normalise(gold)
    if not expected:
        return _wrong(extracted, "invalid_gold: empty after normalisation")
    if answer == expected:
        return _right(extracted, "equal_after_normalisation")
    exact_answer, exact_gold = as_rational(answer), as_rational(expected)
    if exact_answer and exact_gold:
        if exact_answer[0] == exact_gold[0]:
            return _right(extracted, "equivalent: exact_rational")
        # With a decimal on either side math-verify's rounding rule decides (1/3 ~ 0.333333).
        if not (exact_answer[1] or exact_gold[1]):
            return _wrong(extracted, f"not_equivalent: {_short(answer)} vs {_short(expected)}")
    if max(len(answer), len(expected)) > _MAX_SYMBOLIC_CHARS:
        detail = f"{_short(answer)} vs {_short(expected)} (too long to compare symbolically)"
        return _wrong(extracted, f"not_equivalent: {detail}")
    return _Check(extracted, answer, expected)


def _conclude(check: _Check, outcome: Outcome) -> Verdict:
    equivalent, note = outcome
    if equivalent is None:
        return _wrong(check.extracted, note)
    if equivalent:
        return _right(check.extracted, "equivalent: math_verify")
    detail = f"{_short(check.answer)} vs {_short(check.gold)}"
    return _wrong(check.extracted, f"not_equivalent: {detail}" + (f" ({note})" if note else ""))


class _QuietTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeouts are off; time is bounded by Grader instead.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeoutWarning())


@lru_cache(maxsize=65536)
def _parsed(latex: str) -> tuple[Any, ...]:
    from math_verify import parse

    # Bare LaTeX parses to nothing; a \boxed{} makes math-verify read the whole string.
    return tuple(parse(f"\\boxed{{{latex}}}", parsing_timeout=None))


@lru_cache(maxsize=65536)
def math_equivalent(answer: str, gold: str) -> Outcome:
    """math-verify's judgement on two normalised answers, with its own timeouts off."""
    from math_verify import verify

    expected, given = _parsed(gold), _parsed(answer)
    if not expected:
        return False, "gold did not parse"
    if not given:
        return False, "answer did not parse"
    return verify(list(expected), list(given), timeout_seconds=None), ""


def _run_equivalence(equivalence: Equivalence, answer: str, gold: str) -> Outcome:
    try:
        return equivalence(answer, gold)
    except Exception as error:  # a crash in sympy is a wrong answer, not a stopped run
        return False, f"error: {type(error).__name__}"


def grade(response: str, gold: str) -> Verdict:
    """Grade one response in this thread. Safe in any thread; not bounded in time."""
    staged = _prepare(response, gold)
    if isinstance(staged, Verdict):
        return staged
    return _conclude(staged, _run_equivalence(math_equivalent, staged.answer, staged.gold))


# ---------------------------------------------------------------------- worker processes

# A plain interpreter, not multiprocessing: nothing re-imports the caller's __main__
# (Prefect scripts, notebooks), and the parent's threads are never forked.
_WORKER_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[3]); "
    "from flows.grading import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)
_READY = "ready"
_STARTUP_TIMEOUT_S = 120.0


def _worker_main(inbox_fd: int, outbox_fd: int) -> None:
    """Worker loop: receive the equivalence function, then chunks of keys; send one
    outcome per key as soon as it is known, so the parent can tell which key hangs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    equivalence = inbox.recv()
    _run_equivalence(equivalence, "1", "1")  # warm up sympy before the clock runs
    outbox.send(_READY)
    while True:
        try:
            chunk = inbox.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for answer, gold in chunk:
            outbox.send(_run_equivalence(equivalence, answer, gold))


@dataclass
class _Job:
    keys: list[Key]
    done: int  # outcomes received so far
    last_progress: float  # monotonic time of the send or of the last outcome


class _Worker:
    def __init__(self, equivalence: Equivalence) -> None:
        inbox_read, inbox_write = os.pipe()
        outbox_read, outbox_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(inbox_read), str(outbox_write),
             json.dumps(sys.path)],
            pass_fds=(inbox_read, outbox_write),
            stdin=subprocess.DEVNULL,
        )
        os.close(inbox_read)
        os.close(outbox_write)
        self.outbox = Connection(inbox_write, readable=False)
        self.inbox = Connection(outbox_read, writable=False)
        self.outbox.send(equivalence)
        self.job: _Job | None = None

    def wait_ready(self) -> None:
        try:
            if not self.inbox.poll(_STARTUP_TIMEOUT_S) or self.inbox.recv() != _READY:
                raise EOFError
        except (EOFError, OSError):
            self.stop(kill=True)
            raise RuntimeError(
                f"grader worker failed to start (exit code {self.process.returncode}); "
                "see its stderr"
            ) from None

    def send(self, keys: list[Key]) -> None:
        self.job = _Job(keys, 0, time.monotonic())
        self.outbox.send(keys)

    def receive(self, results: dict[Key, Outcome]) -> None:
        """Store the outcomes that have arrived; EOFError when the worker died."""
        assert self.job is not None
        while self.job.done < len(self.job.keys) and self.inbox.poll():
            results[self.job.keys[self.job.done]] = self.inbox.recv()
            self.job.done += 1
            self.job.last_progress = time.monotonic()
        if self.job.done == len(self.job.keys):
            self.job = None

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.outbox.send(None)
                self.process.wait(timeout=0.2)
            except (OSError, subprocess.TimeoutExpired):
                pass  # a worker holds no state: killing it loses nothing
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.outbox.close()
        self.inbox.close()


class _Pool:
    """Worker processes running an equivalence function, each key bounded in time."""

    def __init__(self, size: int, timeout_s: float, equivalence: Equivalence) -> None:
        self._size = size
        self._timeout_s = timeout_s
        self._equivalence = equivalence
        self._workers: list[_Worker] = []

    def run(self, keys: list[Key], chunk_size: int) -> dict[Key, Outcome]:
        if not self._workers:
            self._workers = self._start(self._size)
        size = max(1, min(chunk_size, math.ceil(len(keys) / self._size)))
        queue = deque(keys[i : i + size] for i in range(0, len(keys), size))
        try:
            return self._drain(queue)
        except BaseException:
            # Interrupted mid-job: outcomes still in the pipes would answer the next call.
            for worker in self._workers:
                worker.stop(kill=True)
            self._workers = []
            raise

    def _drain(self, queue: deque[list[Key]]) -> dict[Key, Outcome]:
        results: dict[Key, Outcome] = {}
        tick = min(0.1, self._timeout_s / 4)
        while queue or any(w.job for w in self._workers):
            for worker in self._workers:
                if worker.job is None and queue:
                    worker.send(queue.popleft())
            busy = [w for w in self._workers if w.job]
            wait([w.inbox for w in busy], timeout=tick)
            for worker in busy:
                try:
                    worker.receive(results)
                except (EOFError, OSError):
                    self._replace(worker, queue, results, "grader_crash: worker process died")
                    continue
                if worker.job and time.monotonic() - worker.job.last_progress > self._timeout_s:
                    reason = f"grader_timeout: no result within {self._timeout_s:g} s"
                    self._replace(worker, queue, results, reason)
        return results

    def _replace(
        self, worker: _Worker, queue: deque[list[Key]], results: dict[Key, Outcome], reason: str
    ) -> None:
        """Blame the key the worker was on, restart it, and requeue the rest of its job."""
        assert worker.job is not None
        keys, index = worker.job.keys, worker.job.done
        results[keys[index]] = (None, reason)
        if index + 1 < len(keys):
            queue.appendleft(keys[index + 1 :])
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = self._start(1)[0]

    def _start(self, count: int) -> list[_Worker]:
        workers = [_Worker(self._equivalence) for _ in range(count)]
        try:
            for worker in workers:  # started together, so they import sympy in parallel
                worker.wait_ready()
        except RuntimeError:
            for worker in workers:
                worker.stop(kill=True)
            raise
        return workers

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []


class Grader:
    """Grades batches; math-verify runs in `workers` processes, each answer bounded in time.

    `Grader(workers=0)` grades in this process with no time bound (tests, tiny inputs).
    Extraction and the cheap rules run in the calling thread; only the comparisons they
    cannot settle are sent, deduplicated, to the workers in chunks of `chunk_size`. An
    answer that takes longer than `timeout_s` is graded `grader_timeout`, its worker is
    killed and restarted, and the rest of its chunk is graded by the new worker.
    `equivalence` is what the workers call; it travels by reference, so it must be a
    module-level function (tests inject one that crashes).
    """

    def __init__(
        self,
        workers: int = 1,
        timeout_s: float = 5.0,
        *,
        chunk_size: int = 256,
        equivalence: Equivalence = math_equivalent,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self._chunk_size = chunk_size
        self._equivalence = equivalence
        self._lock = threading.Lock()
        self._pool = _Pool(workers, timeout_s, equivalence) if workers else None
        self._finalizer = weakref.finalize(self, self._pool.close) if self._pool else None

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (response, gold) pairs, in order."""
        staged = [_prepare(response, gold) for response, gold in pairs]
        keys = list(dict.fromkeys(s.key for s in staged if isinstance(s, _Check)))
        outcomes = self._outcomes(keys) if keys else {}
        return [s if isinstance(s, Verdict) else _conclude(s, outcomes[s.key]) for s in staged]

    def _outcomes(self, keys: list[Key]) -> dict[Key, Outcome]:
        if self._pool is None:
            return {key: _run_equivalence(self._equivalence, *key) for key in keys}
        with self._lock:
            return self._pool.run(keys, self._chunk_size)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- JSONL


def grade_jsonl(
    lines: Iterable[str], source: str = "<stdin>", *, workers: int = 1, batch_size: int = 4096
) -> Iterator[str]:
    """Grade JSON lines holding `answer` (gold) and `response`; yield them with
    `correct`, `extracted` and `reason` added, every other key kept in its order.

    Blank lines are skipped. A bad line raises GradeInputError naming the source, the
    1-based line number and the field; lines of earlier batches have been yielded by then.
    """
    with Grader(workers=workers) as grader:
        batch: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            batch.append(_read_row(line, source, number))
            if len(batch) >= batch_size:
                yield from _graded_lines(grader, batch)
                batch = []
        if batch:
            yield from _graded_lines(grader, batch)


def _read_row(line: str, source: str, number: int) -> dict[str, Any]:
    where = f"{source} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise GradeInputError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise GradeInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("answer", "response"):
        if field not in row:
            raise GradeInputError(f"{where}: missing field {field!r}")
    if not isinstance(row["answer"], str) or not row["answer"].strip():
        raise GradeInputError(f"{where}: field 'answer' must be a non-empty string")
    if not isinstance(row["response"], str):
        raise GradeInputError(f"{where}: field 'response' must be a string")
    return row


def _graded_lines(grader: Grader, rows: list[dict[str, Any]]) -> Iterator[str]:
    verdicts = grader.grade_many([(row["response"], row["answer"]) for row in rows])
    for row, verdict in zip(rows, verdicts, strict=True):
        row.update(correct=verdict.correct, extracted=verdict.extracted, reason=verdict.reason)
        yield json.dumps(row, ensure_ascii=False)
