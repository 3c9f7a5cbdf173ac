"""GeneralPoints, the 24-point card game of Chu et al. 2025 ("SFT Memorizes, RL Generalizes"), PAPER_SPEC 2.

Faithful to upstream (SFTvsRL: gym_cards general_points_oneline, utils_rl.step_rewards,
prompt_lib.Q_GeneralPoint_EQN_L) in the prompt text, the hand sampling, the answer parsing, the reward
table and the feedback sentences. Deliberate differences, each safer and never a change of the game:
- formulas are evaluated with exact fractions by a small parser, never with `eval` (upstream's floats
  score `8/(3-8/3)` as wrong; here it is correct);
- only ASCII digits count as digits (upstream's `\\d` also matched other scripts' digits);
- `solve` returns every distinct solution written with minimal parentheses; upstream's solver wrote
  its (fewer) solutions from a fixed set of bracket placements. The NO_SOLUTION sentence names the longest
  prefix of upstream's strings (`upstream_solutions`), as upstream's did, so the feedback is upstream's.
- suits are drawn upstream but never shown to a language model; they are not drawn here, except that
  `sample_hand(env_draws=True)` takes their draws from the stream, to replay upstream's test hands.
- PARTIAL (an unfinished formula that uses every number) is judged by the arithmetic: the formula earns it
  when closing its open parentheses makes it equal the target exactly. Upstream gave it when the text was
  a prefix of one of its solver's strings, so the reward hung on which bracket placements that solver
  wrote: `10+(10+10-6` scored +1 there but `(10-6+10+10` scored -1. `partial_credit="upstream"` keeps
  upstream's rule, with its bracket placements.
"""
from __future__ import annotations

import functools
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, Iterable, Sequence

# solve, is_solvable and evaluate are part of cards' public API (DESIGN.md); they live in arithmetic.
from .arithmetic import (MAX_DIGITS, TARGET, completes_to_target, evaluate, is_solvable, solve,  # noqa: F401
                         token_kind, upstream_solutions)

RULES = ("id", "ood")
SUITS = ["H", "S", "D", "C"]  # upstream draws them (never shown to a language model): env_draws only
RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # rank r is RANKS[r - 1]

PARTIAL_CREDIT = ("arithmetic", "upstream")  # how PARTIAL is decided; see the module docstring
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

# Passed to every chat template (SFT text, rollouts, evaluation). Llama-3.x templates write a "Today Date"
# into their system block, today's by strftime_now unless date_string is given, so a prompt would change
# with the day a stage ran and cached results would answer another prompt. The date is the templates' own
# fallback; templates without a date (Qwen, SmolLM2, tiny) ignore it.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


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


_DRAWS_BEFORE_CHECK = 10_000  # at 24, ~70% of draws are solvable: only a target no hand makes gets here


@functools.lru_cache(maxsize=None)
def _reachable(rule: str, target: int) -> bool:
    """Whether any hand makes target under the rule (every multiset of four ranks; seconds where none)."""
    draws = itertools.combinations_with_replacement(range(1, 14), 4)
    hands = {tuple(sorted(card_value(RANKS[r - 1], rule) for r in ranks)) for ranks in draws
             if rule == "id" or max(ranks) >= 11}
    return any(is_solvable(hand, target) for hand in hands)


def sample_hand(rng: random.Random, rule: str, target: int = TARGET, env_draws: bool = False) -> Hand:
    """A hand solvable under `rule`, drawn as upstream does (PAPER_SPEC 2.2).

    ID: four ranks uniform in 1..13. OOD: three ranks in 1..13 and one in 11..13, shuffled, so every
    OOD hand holds a face card. Resampled until solvable under the rule. env_draws: take from `rng` what
    upstream's env took from its stream besides the ranks (general_points_oneline: four suits, then its
    solver's shuffle of the hand's distinct orderings), so that a stream seeded as upstream's gives its hands.
    """
    _check_rule(rule)
    for attempt in itertools.count(1):
        if attempt == _DRAWS_BEFORE_CHECK and not _reachable(rule, target):
            raise ValueError(f"no hand of four cards makes {target} under the {rule} rule, so none can be drawn; "
                             f"choose another data.target (the paper's is {TARGET})")
        if rule == "id":
            ranks = [rng.randint(1, 13) for _ in range(4)]
        else:
            ranks = [rng.randint(1, 13) for _ in range(3)] + [rng.randint(11, 13)]
            rng.shuffle(ranks)
        hand = Hand(tuple(RANKS[r - 1] for r in ranks), rule)
        if env_draws:
            for _ in range(4):
                rng.choice(SUITS)
            rng.shuffle([None] * len(set(itertools.permutations(hand.numbers))))  # only the length draws
        if is_solvable(hand.numbers, target):
            return hand


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
_MAX_MESSAGE = 1000


def _number(token: str) -> int | str:
    return int(token) if len(token) <= MAX_DIGITS else f"{token[:MAX_DIGITS]}..."


def _sequence_errors(tokens: list[str]) -> list[str]:
    """Upstream's token-sequence checks, one message per violation."""
    errors, depth, prev = [], 0, None
    for token in tokens:
        kind = token_kind(token)
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


def _is_whole(n: object) -> bool:
    """An integer card value (4, numpy's int64, 4.0), never a bool, 1.5 or "4"."""
    return not isinstance(n, bool) and (isinstance(n, Integral) or (isinstance(n, float) and n.is_integer()))


def verify_formula(formula: str, numbers: Sequence[int], target: int = TARGET,
                   partial_credit: str = "arithmetic") -> Verdict:
    """Grade a formula (the text before `=`) for a hand's numbers with the reward table of PAPER_SPEC 2.4.
    `partial_credit` decides PARTIAL: "arithmetic" (completable to the target) or "upstream" (a prefix of
    upstream's solution strings); see the module docstring.

    Never evaluates model text as code and returns a verdict for any string.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a str, got {type(formula).__name__}")
    if partial_credit not in PARTIAL_CREDIT:
        raise ValueError(f"partial_credit must be one of {PARTIAL_CREDIT}, got {partial_credit!r}")
    if not numbers or not all(_is_whole(n) for n in numbers):
        raise ValueError(f"numbers must be a non-empty list of integers (a hand's card values), got {list(numbers)!r}")
    tokens = _TOKEN_RE.findall(formula)
    if "".join(tokens) != formula:
        return Verdict("ILLEGAL_FORMULA", REWARDS["ILLEGAL_FORMULA"], "illegal characters.")

    penalties: list[tuple[str, str]] = [("ILLEGAL_FORMULA", m) for m in _sequence_errors(tokens)]
    used = Counter(_number(t) for t in tokens if token_kind(t) == "number")
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
        # upstream's solver strings: its PARTIAL rule (partial_credit "upstream") and, under either rule, the
        # NO_SOLUTION sentence's prefix, so the feedback reads as upstream's
        solutions = upstream_solutions(tuple(sorted(have.elements())), target)
        value = evaluate(tokens)
        if value is not None and value == target:
            return Verdict("CORRECT", REWARDS["CORRECT"], "Correct solution.")
        partial = (any(s.startswith(formula) for s in solutions) if partial_credit == "upstream"
                   else completes_to_target(tokens, target))
        if value is None and partial:
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


def step_episode(episode: Episode, text: str, target: int = TARGET,
                 grade: Callable[[Hand, str], Verdict] | None = None, partial_credit: str = "arithmetic") -> Attempt:
    """Grade one answer and extend the conversation: the answer, then on failure the feedback turn.
    `grade(hand, text) -> Verdict` replaces the verifier (RL tests train on an easier reward); otherwise
    verify_formula judges, PARTIAL by `partial_credit`."""
    formula = parse_formula(text)
    verdict = (grade(episode.hand, text) if grade
               else verify_formula(formula, episode.hand.numbers, target, partial_credit))
    attempt = Attempt(text, formula, verdict)
    episode.attempts.append(attempt)
    episode.messages.append({"role": "assistant", "content": text})
    if not attempt.verdict.correct:
        episode.messages.append({"role": "user", "content": attempt.verdict.feedback})
    return attempt


def is_finished(episode: Episode, max_attempts: int = 5) -> bool:
    return episode.success or len(episode.attempts) >= max_attempts


def run_episodes(generate: Generate, hands: Iterable[Hand], max_attempts: int = 5,
                 target: int = TARGET, partial_credit: str = "arithmetic") -> list[Episode]:
    """Play every hand by the multi-turn protocol, batching all unfinished episodes into each call of
    `generate(conversations) -> texts` (the conversations end with a user turn). `partial_credit` is the
    PARTIAL rule of the feedback turns (verify_formula)."""
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
            step_episode(episode, text, target, partial_credit=partial_credit)
    return episodes


def success_rate(episodes: Sequence[Episode]) -> float:
    return sum(e.success for e in episodes) / len(episodes) if episodes else float("nan")
