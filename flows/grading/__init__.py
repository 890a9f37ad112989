"""Grade teacher answers against gold answers.

In: a teacher's tagged response text and the problem's gold answer.
Out: a `Verdict` — correct or not, the answer that was extracted, a reason whose
snake_case prefix can be grepped (`no_answer`, `truncated`, `empty_answer`,
`master_key`, `equal_after_normalisation`, `equivalent`, `not_equivalent`,
`grader_timeout`, `grader_crash`, `grader_error`, ...), the rule that decided (`method`:
`rule`, `normalised_string`, `exact`, `math_verify`, `grader_error`) and whether both
sides were parsed as values (`parse_status`).
Run: `distillery grade FILE.jsonl` (see `grade_jsonl`); `distillery grade --audit FILE.jsonl`
lists where our grader and math-verify alone disagree, grouped by our reason (`audit_jsonl`).

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
- Both sides are normalised (thousands separators, `2,\\!500`, leading zeros, units,
  `\\$`, `%`, `\\dfrac`, surrounding `$`, trailing period, `bmatrix`/`array` as `pmatrix`
  with their rows kept, `2 3/4` as `2\\frac{3}{4}`, "3 and 5" / `3 \\quad 5` as "3, 5", a
  degree sign dropped from bare angles and read as π/180 inside an expression); equal
  strings are correct.
- `x = 5` is read as `5` only when the other side is not an equation: `x = 2` and `y = 2`
  differ, while two equations of one line (`3x-6y=12`, `y=x/2-2`) are compared by math-verify.
- Several different boxed values where the answer is read are a hedge, and wrong, unless
  the gold has as many parts ("3, 5" against `\\boxed{3}` and `\\boxed{5}`). Prose in an
  `<answer>` block without a box gives its last `$…$` span ("so $x \\le 3$.").
- Forms math-verify misreads are compared as text (`forms.text_form`): clock times (`7:05`
  is not 7/5), primed names (`B'` is not `B`), capital letters and choices (`B` is not `b`,
  a letter `e` is not 2.718…), a sign before a bracket (`-(2, 5]` is not 5).
- Integers and fractions are compared exactly as rationals; a mixed number `2\\frac{3}{4}` is 11/4.
  An answer with a percent sign equals a gold without one when its number is the gold
  (`28\\%` for 28, the gold counted in percent) or its value is (`28\\%` for 7/25).
- A decimal against an exact value (`forms.decimal_matches`): equal when it gives at least
  6 significant digits and each is the exact value's, truncated or rounded at its last
  digit (0.142857 and 0.1428571 are 1/7; 0.14286, 0.333 and 1.41421357 are not 1/7, 1/3
  and √2). Two decimals are equal only when their values are.
- `i` is the imaginary unit whenever a side has it: (1+i)^2 = 2i.
- Everything else is parsed by math-verify (sympy). When both sides are exact numbers —
  integers, rationals, pi and e combined by arithmetic, powers, roots, factorials and
  binomials, or tuples, intervals and sets of them — equality is decided by exact
  arithmetic (`exact`). math-verify's own comparison has a float tolerance, so size could
  fool it: 1/2^100 "equals" 1/2^101, √(10^40+1) "equals" 10^20. math-verify decides only
  when a symbol or another kind of value is involved, or a number too large to evaluate
  such as 9^(9^9).
- math-verify's timeouts use `signal.alarm`, which fails outside the main thread, so
  they are switched off: `grade` is safe in any thread but unbounded in time, and
  `Grader` bounds it by running the comparison in worker processes that it kills and
  restarts when one answer takes too long.

Modules
-------
`extraction` (the final answer), `normalisation` (canonical strings, master keys, exact
rationals), `forms` (times, letters, primes, parts, assignments, the decimal rule), `exact`
(exact comparison of parsed numbers), `compare` (`grade`: cheap rules, then sympy;
`math_verify_alone`, the audit's second opinion), `workers` (the worker processes), `grader` (`Grader`, batches),
`jsonl` (`grade_jsonl`, `audit_jsonl`, `GradeInputError`), `refusal` (empty and refusing responses).
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
from flows.grading.jsonl import Audit, GradeInputError, audit_jsonl, grade_jsonl
from flows.grading.normalisation import as_rational, master_key, normalise

__all__ = [
    "GRADER_VERSION",
    "Audit",
    "audit_jsonl",
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
