"""Decide equality of exact numbers by exact arithmetic, never by a float tolerance.

math-verify compares `(a - b).evalf(chop=True)` with zero, so values that differ by less
than its precision compare equal: 2^-100 "equals" 2^-101. Here both parsed sides are
rebuilt from integers, rationals, pi, e and i with +, ×, integer powers, roots, factorials and
binomials (`exact_value`), and `compare_exact` decides numbers, tuples, intervals and sets
of them exactly. Anything else — a decimal, a symbol, a matrix, a value too large to
evaluate quickly, or an equality sympy can neither prove nor refute — is left to math-verify.
"""

from __future__ import annotations

from sympy import (
    Add,
    Basic,
    E,
    Expr,
    I,
    FiniteSet,
    Interval,
    Mul,
    Pow,
    Rational,
    Tuple,
    binomial,
    factorial,
    pi,
)

# Limits that keep exact evaluation fast: 2^1000000 is instant, 9^(9^9) never ends.
_MAX_POWER_BITS = 1_000_000
_MAX_FACTORIAL = 10_000
_MAX_ROOT_BITS = 1024  # sympy looks for factors of a root's base: seconds at 4000 bits
_IRRATIONAL_BASE_BITS = 64  # a size guess for a base that is not rational
_ORDERED = {"tuple", "interval()"}  # an open interval (a, b) may be meant as a pair


class _NotExact(Exception):
    pass


def exact_value(expr: Basic) -> Expr | None:
    """expr evaluated exactly when it is a finite exact number, else None."""
    try:
        value = _evaluate(expr)
    except _NotExact:
        return None
    return value if value.is_finite else None


def _evaluate(node: Basic) -> Expr:
    if isinstance(node, Rational) or node in (pi, E, I):
        return node
    if isinstance(node, (Add, Mul)):
        return node.func(*(_evaluate(arg) for arg in node.args))
    if isinstance(node, Pow):
        base, exponent = (_evaluate(arg) for arg in node.args)
        if not isinstance(exponent, Rational) or _power_bits(base, exponent) > _MAX_POWER_BITS:
            raise _NotExact
        if exponent.q != 1 and isinstance(base, Rational) and _bits(base) > _MAX_ROOT_BITS:
            raise _NotExact
        return Pow(base, exponent)
    if isinstance(node, (factorial, binomial)):
        args = [_evaluate(arg) for arg in node.args]
        if all(arg.is_Integer and abs(arg) <= _MAX_FACTORIAL for arg in args):
            return node.func(*args)
    raise _NotExact


def _power_bits(base: Expr, exponent: Rational) -> int:
    size = _bits(base) if isinstance(base, Rational) else _IRRATIONAL_BASE_BITS
    return abs(exponent.p) * size


def _bits(number: Rational) -> int:
    """About log2 of the larger of numerator and denominator (0 for 0 and ±1)."""
    return max(abs(number.p).bit_length(), number.q.bit_length()) - 1


def compare_exact(gold: Basic, answer: Basic) -> bool | None:
    """Whether two parsed values are equal, decided exactly; None when math-verify decides.

    Containers are read as math-verify reads them: sets as sets (a number is a set of
    one), tuples element by element (an open interval is also a pair), intervals by
    endpoints and brackets. A pair against a set is math-verify's to decide, since it
    picks the order, but only when their values agree exactly as multisets.
    """
    gold_shape, answer_shape = _shape(gold), _shape(answer)
    if gold_shape is None or answer_shape is None:
        return None
    (gold_kind, gold_values), (answer_kind, answer_values) = gold_shape, answer_shape
    kinds = {gold_kind, answer_kind}
    if kinds == {"set"}:
        return _same_multiset(gold_values, answer_values)
    if len(kinds) == 1 or kinds <= _ORDERED:  # same kind of bracket, or an open interval
        same_length = len(gold_values) == len(answer_values)
        return same_length and _all_equal(gold_values, answer_values)
    if kinds <= _ORDERED | {"set"}:
        return False if _same_multiset(gold_values, answer_values) is False else None
    return False  # an interval with a closed end is neither a pair nor a finite set


def _shape(expr: Basic) -> tuple[str, list[Expr]] | None:
    """(kind, exact values), kind "set", "tuple" or "interval" with its brackets; None
    when some value is not an exact number."""
    if isinstance(expr, Interval):
        kind = "interval" + ("(" if expr.left_open else "[") + (")" if expr.right_open else "]")
        items = [expr.start, expr.end]
    elif isinstance(expr, Tuple):
        kind, items = "tuple", list(expr.args)
    elif isinstance(expr, FiniteSet):
        kind, items = "set", list(expr.args)
    else:
        kind, items = "set", [expr]
    values = [exact_value(item) if isinstance(item, Basic) else None for item in items]
    if any(value is None for value in values):
        return None
    return kind, list(dict.fromkeys(values)) if kind == "set" else values


def _all_equal(gold: list[Expr], answer: list[Expr]) -> bool | None:
    verdicts = [_equal(g, a) for g, a in zip(gold, answer, strict=True)]
    return False if False in verdicts else None if None in verdicts else True


def _same_multiset(gold: list[Expr], answer: list[Expr]) -> bool | None:
    if len(gold) != len(answer):
        return False
    unmatched = list(answer)
    for value in gold:
        verdicts = [_equal(value, other) for other in unmatched]
        if True not in verdicts:
            return None if None in verdicts else False
        unmatched.pop(verdicts.index(True))
    return True


def _equal(a: Expr, b: Expr) -> bool | None:
    """Exact equality; None when sympy can prove neither."""
    if a == b:
        return True
    if isinstance(a, Rational) and isinstance(b, Rational):
        return False
    difference = a - b
    if isinstance(difference, Rational):
        return difference == 0
    # Assumptions evaluate numerically, raising the precision until the sign is certain;
    # `equals` proves zero (minimal polynomials for radicals).
    zero = difference.is_zero
    return difference.equals(0) if zero is None else zero
