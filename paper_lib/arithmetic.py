"""The exact arithmetic of the 24-point game: every solution of a hand, and the exact value of a formula.

Values are Fractions throughout, so `8/(3-8/3)` is 24, and no text is ever evaluated as code. `solve`
writes each distinct solution once with minimal parentheses; `upstream_solutions` rebuilds the strings
upstream's solver (SFTvsRL gym_cards) wrote, for its partial-credit rule.
"""
from __future__ import annotations

import functools
import itertools
from fractions import Fraction
from typing import Iterable, Sequence

TARGET = 24
MAX_DIGITS = 12  # longer numbers cannot be cards; they are reported shortened, never converted


# An expression while solving: exact value, text with minimal parentheses, precedence of its top operator.
_ATOM, _MUL, _ADD = 3, 2, 1
_PREC = {"+": _ADD, "-": _ADD, "*": _MUL, "/": _MUL}


@functools.lru_cache(maxsize=None)
def _values(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Every value a sorted multiset of numbers can make; cached, so hands share their sub-multisets."""
    if len(numbers) == 1:
        return frozenset({Fraction(numbers[0])})
    out: set[Fraction] = set()
    full = (1 << len(numbers)) - 1
    sub = (full - 1) & full
    while sub:
        left = _values(tuple(x for i, x in enumerate(numbers) if sub >> i & 1))
        right = _values(tuple(x for i, x in enumerate(numbers) if not sub >> i & 1))
        for a in left:
            for b in right:
                out.update((a + b, a - b, a * b))
                if b:
                    out.add(a / b)
        sub = (sub - 1) & full
    return frozenset(out)


def _operands(op: str, a: Fraction, value: Fraction, candidates: set[Fraction]) -> Iterable[Fraction]:
    """The right operands b among candidates with `a op b == value`."""
    if op == "+":
        wanted = {value - a}
    elif op == "-":
        wanted = {a - value}
    elif op == "*":
        wanted = candidates if a == 0 and value == 0 else ({value / a} if a else set())
    elif value:  # a / b == value != 0 needs a != 0, and then b = a / value
        wanted = {a / value} if a else set()
    else:  # a / b == 0 needs a == 0 and any b != 0
        wanted = {b for b in candidates if b} if a == 0 else set()
    return wanted & candidates


@functools.lru_cache(maxsize=4096)
def _solutions(numbers: tuple[int, ...], target: int) -> tuple[str, ...]:
    values = {m: _values(tuple(x for i, x in enumerate(numbers) if m >> i & 1)) for m in range(1, 1 << len(numbers))}
    memo: dict[tuple[int, Fraction], set[tuple[str, int]]] = {}

    def texts(mask: int, value: Fraction) -> set[tuple[str, int]]:
        """Every (text, precedence) over the numbers in mask that equals value (top-down, so only
        branches that reach the target are ever written out)."""
        if (mask, value) in memo:
            return memo[(mask, value)]
        if mask & (mask - 1) == 0:
            out = {(str(numbers[mask.bit_length() - 1]), _ATOM)}
        else:
            out = set()
            sub = (mask - 1) & mask
            while sub:
                other = mask ^ sub
                for a in values[sub]:
                    for op in "+-*/":
                        for b in _operands(op, a, value, values[other]):
                            for ta, pa in texts(sub, a):
                                for tb, pb in texts(other, b):
                                    out.add(_render(ta, pa, op, tb, pb))
                sub = (sub - 1) & mask
        memo[(mask, value)] = out
        return out

    full = (1 << len(numbers)) - 1
    if Fraction(target) not in values[full]:
        return ()
    return tuple(sorted({t for t, _ in texts(full, Fraction(target))}, key=lambda s: (len(s), s)))


def _render(ta: str, pa: int, op: str, tb: str, pb: int) -> tuple[str, int]:
    prec = _PREC[op]
    left = f"({ta})" if pa < prec else ta
    # The right operand of - or / needs parentheses at equal precedence too: a-(b+c), a/(b*c).
    right = f"({tb})" if pb < prec or (pb == prec and op in "-/") else tb
    return f"{left}{op}{right}", prec


def solve(numbers: Sequence[int], target: int = TARGET) -> list[str]:
    """Every distinct formula (minimal parentheses, no spaces) that uses each number once and equals
    target exactly; [] if the hand has no solution."""
    return list(_solutions(tuple(sorted(int(n) for n in numbers)), int(target)))


@functools.lru_cache(maxsize=4096)
def upstream_solutions(numbers: tuple[int, ...], target: int = TARGET) -> tuple[str, ...]:
    """The solution strings upstream's solver writes for a hand (gym_cards general_points_oneline.solve):
    every order of the numbers and every operator triple, with no brackets, one pair of brackets around
    any run of two or more numbers except the whole formula, or the pair (a?b)?(c?d); kept where the
    value equals target (exactly here; upstream used Fractions wherever a '/' occurs, so also exactly)."""
    count = len(numbers)
    width = 2 * count - 1  # tokens without brackets
    placements = [()] + [(x, y) for x in range(0, width, 2) for y in range(x + 4, width + 2, 2)
                         if (x, y) != (0, width + 1)] + [(0, 4, 6, 10)]
    found = set()
    for order in sorted(set(itertools.permutations(numbers))):
        for ops in itertools.product("+-*/", repeat=count - 1):
            plain = [str(order[0])] + [t for pair in zip(ops, map(str, order[1:])) for t in pair]
            for spots in placements:
                tokens = list(plain)
                for spot, bracket in zip(spots, "()" * (len(spots) // 2)):
                    tokens.insert(spot, bracket)
                if evaluate(tokens) == target:
                    found.add("".join(tokens))
    return tuple(sorted(found))


def completes_to_target(tokens: list[str], target: int) -> bool:
    """Whether closing the formula's open parentheses makes it equal target exactly. Every number is used
    already, so appending ')' is the only completion there is."""
    depth = tokens.count("(") - tokens.count(")")
    return depth > 0 and evaluate([*tokens, *(")" * depth)]) == target


def is_solvable(numbers: Sequence[int], target: int = TARGET) -> bool:
    """Whether some formula over numbers equals target (values only, faster than solve())."""
    return _is_solvable(tuple(sorted(int(n) for n in numbers)), int(target))


@functools.lru_cache(maxsize=None)
def _is_solvable(numbers: tuple[int, ...], target: int) -> bool:
    if len(numbers) == 1:
        return numbers[0] == target
    full, value = (1 << len(numbers)) - 1, Fraction(target)
    sub = (full - 1) & full
    while sub:  # stops at the first split that reaches the target
        left = _values(tuple(x for i, x in enumerate(numbers) if sub >> i & 1))
        right = _values(tuple(x for i, x in enumerate(numbers) if not sub >> i & 1))
        if any(_operands(op, a, value, right) for a in left for op in "+-*/"):
            return True
        sub = (sub - 1) & full
    return False


def token_kind(token: str) -> str:
    if token in "+-*/":
        return "operator"
    return {"(": "open", ")": "close"}.get(token, "number")


def evaluate(tokens: Sequence[str]) -> Fraction | None:
    """Exact value of a tokenised formula, or None where Python could not evaluate it (unbalanced or
    dangling parts, division by zero, a number with a leading zero). Iterative, so 10,000 nested
    parentheses cost no recursion."""
    values: list[Fraction] = []
    ops: list[str] = []

    def reduce() -> bool:
        op = ops.pop()
        if op == "(" or len(values) < 2:
            return False
        b, a = values.pop(), values.pop()
        if op == "/" and b == 0:
            return False
        values.append(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b)
        return True

    expect_operand = True
    for token in tokens:
        kind = token_kind(token)
        if kind == "number":
            if not expect_operand or (len(token) > 1 and token[0] == "0" and token.strip("0")):
                return None
            if len(token) > MAX_DIGITS:
                return None
            values.append(Fraction(int(token)))
            expect_operand = False
        elif kind == "open":
            if not expect_operand:
                return None
            ops.append("(")
        elif kind == "close":
            if expect_operand:
                return None
            while ops and ops[-1] != "(":
                if not reduce():
                    return None
            if not ops:
                return None
            ops.pop()
        else:
            if expect_operand:
                return None
            while ops and ops[-1] != "(" and _PREC[ops[-1]] >= _PREC[token]:
                if not reduce():
                    return None
            ops.append(token)
            expect_operand = True
    if expect_operand:
        return None
    while ops:
        if ops[-1] == "(" or not reduce():
            return None
    return values[0] if len(values) == 1 else None
