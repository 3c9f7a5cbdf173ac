"""GeneralPoints, the 24-point card game of Chu et al. 2025 ("SFT Memorizes, RL Generalizes"), PAPER_SPEC 2.

Faithful to upstream (SFTvsRL: gym_cards general_points_oneline, utils_rl.step_rewards,
prompt_lib.Q_GeneralPoint_EQN_L) in the prompt text, the hand sampling, the answer parsing, the reward
table and the feedback sentences. Deliberate differences, each safer and never a change of the game:
- formulas are evaluated with exact fractions by a small parser, never with `eval` (upstream's floats
  score `8/(3-8/3)` as wrong; here it is correct);
- only ASCII digits count as digits (upstream's `\\d` also matched other scripts' digits);
- `solve` returns every distinct solution written with minimal parentheses; upstream's solver wrote
  its (fewer) solutions from a fixed set of bracket placements. Solutions matter to the reward only
  through prefix matching (PARTIAL and the NO_SOLUTION message).
- suits are drawn upstream but never shown to a language model; they are not drawn here.
"""
from __future__ import annotations

import functools
import json
import numbers
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Sequence

TARGET = 24
RULES = ("id", "ood")
RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # rank r is RANKS[r - 1]

REWARDS = {"CORRECT": 5.0, "PARTIAL": 1.0, "NO_SOLUTION": -1.0, "INCORRECT_NUMBER": -2.0, "ILLEGAL_FORMULA": -3.0}

_FACE_MESSAGE = {
    "id": "'J', 'Q', and 'K' count as '10'.",
    "ood": "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.",
}

# Upstream's Q_GeneralPoint_EQN_L, leading and trailing newlines included. The odd "'10'.," comes from
# the face-card message ending in a period and is kept.
_PROMPT = """
[Task Description]
You are an expert {target} points card game player. You will receive a set of 4 cards.
Note that {face}, and each card must be used once.
Your goal is to output a formula that evaluates to {target} using numbers from the cards and operators such as '+', '-', '*', '/', '(', ')', and '='.

[Input]
Cards: {cards}

[Output]
{{
  "cards": [x, y, z, w], where {face},
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals {target}',
}}

"""

_ANSWER = """{{
  "cards": {cards},
  "number": {numbers},
  "formula": "{formula}={target}",
}}"""

FEEDBACK_PREFIX = "You failed this trial because "


# ----------------------------------------------------------------------------------------------- hands
def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def card_value(card: str, rule: str) -> int:
    """The number a card stands for: A = 1, J/Q/K = 10 under the ID rule, 11/12/13 under the OOD rule."""
    if card not in RANKS:
        raise ValueError(f"unknown card {card!r}; cards are {RANKS}")
    rank = RANKS.index(card) + 1
    return min(rank, 10) if _check_rule(rule) == "id" else rank


@dataclass(frozen=True)
class Hand:
    cards: tuple[str, ...]
    rule: str

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(card_value(c, self.rule) for c in self.cards)


def sample_hand(rng: random.Random, rule: str, target: int = TARGET) -> Hand:
    """A hand solvable under `rule`, drawn as upstream does (PAPER_SPEC 2.2).

    ID: four ranks uniform in 1..13. OOD: three ranks in 1..13 and one in 11..13, shuffled, so every
    OOD hand holds a face card. Resampled until solvable under the rule.
    """
    _check_rule(rule)
    while True:
        if rule == "id":
            ranks = [rng.randint(1, 13) for _ in range(4)]
        else:
            ranks = [rng.randint(1, 13) for _ in range(3)] + [rng.randint(11, 13)]
            rng.shuffle(ranks)
        hand = Hand(tuple(RANKS[r - 1] for r in ranks), rule)
        if is_solvable(hand.numbers, target):
            return hand


# ---------------------------------------------------------------------------------------------- solver
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


# --------------------------------------------------------------------------------- prompts and answers
def prompt_text(cards: Sequence[str], rule: str, target: int = TARGET) -> str:
    """The user turn of PAPER_SPEC 2.3, character for character (upstream's template)."""
    return _PROMPT.format(target=target, face=_FACE_MESSAGE[_check_rule(rule)], cards=list(cards))


def prompt_messages(hand: Hand, target: int = TARGET) -> list[dict[str, str]]:
    """A single user turn, no system prompt: what the chat template renders."""
    return [{"role": "user", "content": prompt_text(hand.cards, hand.rule, target)}]


def answer_text(hand: Hand, formula: str, target: int = TARGET) -> str:
    """The SFT target: cards as shown, their numbers under the rule, and `formula=target`."""
    return _ANSWER.format(cards=list(hand.cards), numbers=list(hand.numbers), formula=formula, target=target)


_FORMULA_RE = re.compile(r'"formula": "(.*?)"')


def parse_formula(text: str) -> str:
    """The formula of a model's answer, as upstream reads it: a JSON parse first, then the regex
    `"formula": "(.*?)"`, keeping what precedes `=`. "None" when there is no formula (upstream's
    sentinel, which grades as an illegal formula)."""
    try:
        formula = json.loads(text)["formula"]
    except Exception:  # any malformed answer falls through to the regex, as upstream
        match = _FORMULA_RE.search(text)
        formula = match.group(1) if match else "None"
    if not isinstance(formula, str):
        formula = json.dumps(formula)
    return formula.split("=")[0]


# ---------------------------------------------------------------------------------------------- verdict
@dataclass(frozen=True)
class Verdict:
    status: str  # CORRECT, PARTIAL, NO_SOLUTION, INCORRECT_NUMBER or ILLEGAL_FORMULA
    reward: float  # the sum of every penalty that applies (upstream adds them up)
    message: str  # e.g. "you used invalid numbers: [11]."

    @property
    def correct(self) -> bool:
        return self.status == "CORRECT"

    @property
    def feedback(self) -> str:
        """The user turn that follows a failed attempt."""
        return FEEDBACK_PREFIX + self.message


_TOKEN_RE = re.compile(r"\d+|[+\-*/()]", re.ASCII)
_MAX_DIGITS = 12  # longer numbers cannot be cards; they are reported shortened, never converted
_MAX_MESSAGE = 1000


def _number(token: str) -> int | str:
    return int(token) if len(token) <= _MAX_DIGITS else f"{token[:_MAX_DIGITS]}..."


def _kind(token: str) -> str:
    if token in "+-*/":
        return "operator"
    return {"(": "open", ")": "close"}.get(token, "number")


def _sequence_errors(tokens: list[str]) -> list[str]:
    """Upstream's token-sequence checks, one message per violation."""
    errors, depth, prev = [], 0, None
    for token in tokens:
        kind = _kind(token)
        if kind in ("number", "open") and prev not in (None, "operator", "open"):
            errors.append("invalid sequence after number" if kind == "number" else "invalid sequence before '('")
        elif kind == "operator" and prev not in ("number", "close"):
            errors.append("invalid sequence after operator")
        elif kind == "close":
            if prev not in ("number", "close"):
                errors.append("invalid sequence after ')'")
            elif depth == 0:
                errors.append("unmatched closing parenthesis")
            else:
                depth -= 1
        elif kind == "open":
            depth += 1
        prev = kind
    return errors


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
        kind = _kind(token)
        if kind == "number":
            if not expect_operand or (len(token) > 1 and token[0] == "0" and token.strip("0")):
                return None
            if len(token) > _MAX_DIGITS:
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


def _is_whole(n: object) -> bool:
    """An integer card value (4, numpy's int64, 4.0), never a bool, 1.5 or "4"."""
    return not isinstance(n, bool) and (isinstance(n, numbers.Integral) or (isinstance(n, float) and n.is_integer()))


def verify_formula(formula: str, numbers: Sequence[int], target: int = TARGET) -> Verdict:
    """Grade a formula (the text before `=`) for a hand's numbers with the reward table of PAPER_SPEC 2.4.

    Never evaluates model text as code and returns a verdict for any string.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a str, got {type(formula).__name__}")
    if not numbers or not all(_is_whole(n) for n in numbers):
        raise ValueError(f"numbers must be a non-empty list of integers (a hand's card values), got {list(numbers)!r}")
    tokens = _TOKEN_RE.findall(formula)
    if "".join(tokens) != formula:
        return Verdict("ILLEGAL_FORMULA", REWARDS["ILLEGAL_FORMULA"], "illegal characters.")

    penalties: list[tuple[str, str]] = [("ILLEGAL_FORMULA", m) for m in _sequence_errors(tokens)]
    used = Counter(_number(t) for t in tokens if _kind(t) == "number")
    have = Counter(int(n) for n in numbers)
    invalid = [n for n in used if n not in have]
    overused = [n for n in used if n in have and used[n] > have[n]]
    if invalid:
        penalties.append(("INCORRECT_NUMBER", f"you used invalid numbers: {invalid}"))
    elif overused:
        penalties.append(("INCORRECT_NUMBER", f"you used numbers: {overused} too many times"))
    unused = [n for n in have if have[n] > used.get(n, 0)]
    if unused:
        penalties.append(("INCORRECT_NUMBER", f"you didn't use numbers: {unused}"))

    if not penalties:
        solutions = solve(numbers, target)
        value = evaluate(tokens)
        if value is not None and value == target:
            return Verdict("CORRECT", REWARDS["CORRECT"], "Correct solution.")
        if value is None and any(s.startswith(formula) for s in solutions):
            return Verdict("PARTIAL", REWARDS["PARTIAL"], "partial solution.")
        # The longest token prefix that some solution starts with, for the feedback sentence.
        prefix = ""
        for token in tokens:
            if not any(s.startswith(prefix + token) for s in solutions):
                break
            prefix += token
        message = (f"{prefix} is partially correct but the full formula does not match any solution"
                   if prefix else "your formula does not match any solution")
        penalties.append(("NO_SOLUTION", message))

    kinds = {kind for kind, _ in penalties}
    status = next(k for k in ("ILLEGAL_FORMULA", "INCORRECT_NUMBER", "NO_SOLUTION") if k in kinds)
    reward = sum(REWARDS[kind] for kind, _ in penalties)
    message = ", ".join(m for _, m in penalties) + "."
    if len(message) > _MAX_MESSAGE:  # hostile input must not become a huge feedback turn
        message = message[:_MAX_MESSAGE - 3] + "..."
    return Verdict(status, reward, message)


def grade_answer(text: str, numbers: Sequence[int], target: int = TARGET) -> Verdict:
    """Parse a model's whole answer and grade its formula."""
    return verify_formula(parse_formula(text), numbers, target)


# --------------------------------------------------------------------------------------------- episodes
Conversation = list[dict[str, str]]
Generate = Callable[[list[Conversation]], list[str]]


@dataclass
class Attempt:
    text: str
    formula: str
    verdict: Verdict


@dataclass
class Episode:
    """One hand played for up to max_attempts graded attempts (PAPER_SPEC 2.5)."""

    hand: Hand
    messages: Conversation
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return any(a.verdict.correct for a in self.attempts)

    @property
    def rewards(self) -> list[float]:
        return [a.verdict.reward for a in self.attempts]


def start_episode(hand: Hand, target: int = TARGET) -> Episode:
    return Episode(hand, prompt_messages(hand, target))


def step_episode(episode: Episode, text: str, target: int = TARGET) -> Attempt:
    """Grade one answer and extend the conversation: the answer, then on failure the feedback turn."""
    formula = parse_formula(text)
    attempt = Attempt(text, formula, verify_formula(formula, episode.hand.numbers, target))
    episode.attempts.append(attempt)
    episode.messages.append({"role": "assistant", "content": text})
    if not attempt.verdict.correct:
        episode.messages.append({"role": "user", "content": attempt.verdict.feedback})
    return attempt


def is_finished(episode: Episode, max_attempts: int = 5) -> bool:
    return episode.success or len(episode.attempts) >= max_attempts


def run_episodes(generate: Generate, hands: Iterable[Hand], max_attempts: int = 5,
                 target: int = TARGET) -> list[Episode]:
    """Play every hand by the multi-turn protocol, batching all unfinished episodes into each call of
    `generate(conversations) -> texts` (the conversations end with a user turn)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    episodes = [start_episode(h, target) for h in hands]
    for _ in range(max_attempts):
        active = [e for e in episodes if not is_finished(e, max_attempts)]
        if not active:
            break
        texts = generate([list(e.messages) for e in active])
        if len(texts) != len(active):
            raise ValueError(f"generate returned {len(texts)} texts for {len(active)} conversations")
        for episode, text in zip(active, texts):
            step_episode(episode, text, target)
    return episodes


def success_rate(episodes: Sequence[Episode]) -> float:
    return sum(e.success for e in episodes) / len(episodes) if episodes else float("nan")
