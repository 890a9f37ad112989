"""Benchmark the grader on one core: answers per second, in-process and with one worker.

Builds realistic (response, gold) pairs — 16 samples per problem as in self-distillation,
reasoning-teacher and tool-teacher formats of a few KB, a mix of correct integers, large
numbers, fractions, symbolic answers, wrong answers, missing and truncated answers and
master keys — pins itself (and so its worker) to one CPU and grades them.

Run: .venv/bin/python bench/bench_grading.py [--pairs 20000] [--seed 0]
Target (issue): >= 2,000 answers/s on one core.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from flows import grading
from flows.grading import compare
from flows.grading import Grader
from schemas.records import Verdict

TARGET_PER_S = 2000
SAMPLES_PER_PROBLEM = 16
FILLER = (
    "We consider the constraint and simplify the expression step by step. "
    "Substituting the values gives {a} + {b} = {c}, and checking the parity rules out {d}. "
)


def _reasoning(rng: random.Random, sentences: int) -> str:
    parts = []
    for _ in range(sentences):
        a, b, d = rng.randint(1, 999), rng.randint(1, 999), rng.randint(1, 99)
        parts.append(FILLER.format(a=a, b=b, c=a + b, d=d))
    return "".join(parts)


def _gold(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A gold answer, answers equivalent to it, and plausible wrong answers."""
    kind = rng.random()
    if kind < 0.55:
        n = rng.randint(0, 5000)
        return str(n), [str(n), str(n), f"{n}."], [str(n + 1), str(n * 10), str(n - 7)]
    if kind < 0.70:
        n = rng.randint(10**9, 10**21)
        return str(n), [str(n), f"{n:,}"], [str(n + 1), str(n // 10)]
    if kind < 0.85:
        p, q = rng.randint(1, 40), rng.randint(41, 97)
        return (
            f"\\frac{{{p}}}{{{q}}}",
            [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}"],
            [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p + 1}}}{{{q}}}"],
        )
    k = rng.randint(2, 30)
    return (
        f"{k}\\sqrt{{2}}",
        [f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}", f"{k}\\sqrt2"],
        [f"{k}\\sqrt{{3}}", f"{k + 1}\\sqrt{{2}}"],
    )


def _response(rng: random.Random, answer: str | None, style: str) -> str:
    thought = _reasoning(rng, rng.randint(20, 60))
    final = f"<answer>\\boxed{{{answer}}}</answer>"
    if style == "truncated":
        return f"<think>{thought} so the answer might be \\boxed{{{answer}}} but"
    if style == "master_key":
        return f"<think>{thought}</think>\n<answer>Let's solve this problem step by step.</answer>"
    if style == "no_answer":
        return f"<think>{thought}</think>\nI could not finish the computation."
    if style == "tool":
        program = f"print({rng.randint(1, 99)} * {rng.randint(1, 99)})"
        tool = f"<code>\n{program}\n</code>\n<executor>\n{answer}\n</executor>\n"
        return f"{thought[:800]}\n{tool}The program confirms it.\n{final}"
    return f"<think>{thought}</think>\nTherefore the result is as follows.\n{final}"


def build_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        gold, right, wrong = _gold(rng)
        for _ in range(SAMPLES_PER_PROBLEM):
            roll = rng.random()
            if roll < 0.60:
                answer, style = rng.choice(right), rng.choice(["reasoning", "reasoning", "tool"])
            elif roll < 0.88:
                answer, style = rng.choice(wrong), "reasoning"
            else:
                answer = rng.choice(right)
                style = rng.choice(["truncated", "master_key", "no_answer"])
            pairs.append((_response(rng, answer, style), gold))
    return pairs[:count]


def _clear_caches() -> None:
    grading.normalise.cache_clear()
    compare._parsed.cache_clear()
    grading.math_equivalent.cache_clear()


@dataclass
class Row:
    mode: str
    seconds: float
    verdicts: list[Verdict]
    note: str


def _timed(mode: str, run: Callable[[], list[Verdict]], note: str) -> Row:
    _clear_caches()
    start = time.perf_counter()
    verdicts = run()
    return Row(mode, time.perf_counter() - start, verdicts, note)


def _print_table(rows: list[Row], pairs: int) -> None:
    print(f"{'mode':<20} {'seconds':>8} {'answers/s':>10}  {'target':<7} note")
    for row in rows:
        rate = pairs / row.seconds
        verdict = "ok" if rate >= TARGET_PER_S else "MISSED"
        print(f"{row.mode:<20} {row.seconds:>8.2f} {rate:>10,.0f}  {verdict:<7} {row.note}")


def _print_reasons(verdicts: list[Verdict]) -> None:
    print(f"\ncorrect: {sum(v.correct for v in verdicts) / len(verdicts):.1%}")
    for title, counts in (
        ("reason", collections.Counter(v.reason.split(":")[0] for v in verdicts)),
        ("method", collections.Counter(v.method for v in verdicts)),
    ):
        print(f"\n{title:<28} {'count':>7}")
        for name, count in counts.most_common():
            print(f"{name:<28} {count:>7,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})  # the worker inherits it: parent and worker share one core
    pairs = build_pairs(args.pairs, args.seed)
    megabytes = sum(len(response) for response, _ in pairs) / 1e6
    grading.grade(pairs[0][0], "warm up math-verify")  # one-off sympy/ANTLR warm-up

    rows = []
    started = time.perf_counter()
    with Grader(workers=1) as pooled:
        pooled.grade_many([("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")])  # starts the worker: once a run
        startup = f"+ {time.perf_counter() - started:.2f} s worker start, once"
        rows.append(_timed("Grader(workers=1)", lambda: pooled.grade_many(pairs), startup))
    with Grader(workers=0) as local:
        rows.append(_timed("Grader(workers=0)", lambda: local.grade_many(pairs), "no time bound"))
    one_by_one = lambda: [grading.grade(response, gold) for response, gold in pairs]  # noqa: E731
    rows.append(_timed("grade() loop", one_by_one, "one call per pair, no time bound"))

    load = os.getloadavg()[0]
    checks = [c for c in (compare._prepare(r, g) for r, g in pairs) if isinstance(c, compare._Check)]
    print(f"{len(pairs):,} pairs, {megabytes:.1f} MB of responses, CPU {cpu}, load {load:.1f}")
    print(f"left to sympy: {len(checks):,} pairs, {len({c.key for c in checks}):,} unique\n")
    _print_table(rows, len(pairs))
    assert all(row.verdicts == rows[0].verdicts for row in rows), "modes disagree"
    _print_reasons(rows[0].verdicts)


if __name__ == "__main__":
    main()
