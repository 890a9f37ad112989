"""Grade teacher answers against gold answers.

In: a teacher's tagged response text and the problem's gold answer.
Out: a `Verdict` — correct or not, the answer that was extracted, a reason whose
snake_case prefix can be grepped (`no_answer`, `truncated`, `empty_answer`,
`master_key`, `equal_after_normalisation`, `equivalent`, `not_equivalent`,
`grader_timeout`, `grader_crash`, `grader_error`, ...), the rule that decided (`method`:
`rule`, `normalised_string`, `exact`, `math_verify`, `grader_error`) and whether both
sides were parsed as values (`parse_status`).
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
- Everything else is parsed by math-verify (sympy). When both sides are exact numbers —
  integers, rationals, pi and e combined by arithmetic, powers, roots, factorials and
  binomials, or tuples, intervals and sets of them — equality is decided by exact
  arithmetic (`exact`). math-verify's own comparison has a float tolerance, so size could
  fool it: 1/2^100 "equals" 1/2^101, √(10^40+1) "equals" 10^20. math-verify decides only
  when a decimal, a symbol or another kind of value is involved, or a number too large
  to evaluate such as 9^(9^9); its rounding is what makes 0.333333 equal 1/3.
- math-verify's timeouts use `signal.alarm`, which fails outside the main thread, so
  they are switched off: `grade` is safe in any thread but unbounded in time, and
  `Grader` bounds it by running the comparison in worker processes that it kills and
  restarts when one answer takes too long.

Modules
-------
`extraction` (the final answer), `normalisation` (canonical strings, master keys, exact
rationals), `exact` (exact comparison of parsed numbers), `compare` (`grade`: cheap
rules, then sympy), `workers` (the worker processes), `grader` (`Grader`, batches),
`jsonl` (`grade_jsonl`, `GradeInputError`).
Their public names (and the internals the bench uses) are importable from here.
"""

from __future__ import annotations

from flows.grading.compare import (
    GRADER_VERSION,
    Equivalence,
    Key,
    Outcome,
    grade,
    math_equivalent,
)
from flows.grading.extraction import NO_ANSWER, extract_final_answer
from flows.grading.grader import Grader
from flows.grading.jsonl import GradeInputError, grade_jsonl
from flows.grading.normalisation import as_rational, master_key, normalise

__all__ = [
    "GRADER_VERSION",
    "NO_ANSWER",
    "Equivalence",
    "GradeInputError",
    "Grader",
    "Key",
    "Outcome",
    "as_rational",
    "extract_final_answer",
    "grade",
    "grade_jsonl",
    "master_key",
    "math_equivalent",
    "normalise",
]
