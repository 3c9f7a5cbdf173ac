"""The GeneralPoints game: solver, prompt, parser, reward table, hostile input and the episode protocol."""
import itertools
import operator
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paper_lib import cards
from paper_lib.cards import Hand, grade_answer, parse_formula, solve, verify_formula

STATUSES = {"CORRECT", "PARTIAL", "NO_SOLUTION", "INCORRECT_NUMBER", "ILLEGAL_FORMULA"}


# ------------------------------------------------------------------------------------------- solver
def _reference_solvable(numbers, target=24):
    """An independent brute force: every ordering, operator triple and the five tree shapes."""
    ops = [operator.add, operator.sub, operator.mul, operator.truediv]

    def ap(op, a, b):
        if a is None or b is None or (op is operator.truediv and b == 0):
            return None
        return op(a, b)

    for a, b, c, d in set(itertools.permutations(Fraction(n) for n in numbers)):
        for f, g, h in itertools.product(ops, repeat=3):
            shapes = (ap(h, ap(g, ap(f, a, b), c), d), ap(h, ap(f, a, b), ap(g, c, d)),
                      ap(h, ap(g, a, ap(f, b, c)), d), ap(h, a, ap(g, ap(f, b, c), d)),
                      ap(h, a, ap(g, b, ap(f, c, d))))
            if any(v == target for v in shapes):
                return True
    return False


def test_known_count_of_solvable_multisets():
    multisets = list(itertools.combinations_with_replacement(range(1, 14), 4))
    assert len(multisets) == 1820
    assert sum(cards.is_solvable(m) for m in multisets) == 1362


def test_solve_agrees_with_reference_and_every_solution_is_correct():
    rng = random.Random(7)
    multisets = rng.sample(list(itertools.combinations_with_replacement(range(1, 14), 4)), 120)
    for m in multisets:
        solutions = solve(m)
        assert bool(solutions) == _reference_solvable(m) == cards.is_solvable(m), m
        assert len(solutions) == len(set(solutions))
        for s in solutions:
            assert verify_formula(s, m).status == "CORRECT", (m, s)


def test_solve_known_hands():
    assert solve([3, 3, 8, 8]) == ["8/(3-8/3)"]  # float arithmetic (upstream) gets this one wrong
    assert "10+10+3+1" in solve([1, 3, 10, 10])
    assert solve([1, 1, 1, 1]) == []
    assert all(" " not in s and "=" not in s for s in solve([4, 7, 8, 8]))
    assert solve([8, 8, 3, 3]) == solve([3, 8, 3, 8])  # order of the hand does not matter


# ------------------------------------------------------------------------------------ hands, prompts
def test_card_values_follow_the_rule():
    assert [cards.card_value(c, "id") for c in ("A", "10", "J", "Q", "K")] == [1, 10, 10, 10, 10]
    assert [cards.card_value(c, "ood") for c in ("A", "10", "J", "Q", "K")] == [1, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="rule must be one of"):
        cards.card_value("A", "train")
    with pytest.raises(ValueError, match="unknown card"):
        cards.card_value("T", "id")


def test_sampled_hands_are_solvable_and_ood_hands_hold_a_face_card():
    for rule in cards.RULES:
        rng = random.Random(3)
        hands = [cards.sample_hand(rng, rule) for _ in range(300)]
        assert all(cards.is_solvable(h.numbers) for h in hands)
        rng = random.Random(3)
        assert [cards.sample_hand(rng, rule) for _ in range(300)] == hands  # the seed fixes the deal
        rng = random.Random(4)
        assert [cards.sample_hand(rng, rule) for _ in range(300)] != hands
    ood = [cards.sample_hand(random.Random(s), "ood") for s in range(300)]
    assert all(any(c in "JQK" for c in h.cards) for h in ood)
    # ID hands do show face cards too (as 10s), so the rules differ only in what J/Q/K are worth.
    idh = [cards.sample_hand(random.Random(s), "id") for s in range(300)]
    assert any(any(c in "JQK" for c in h.cards) for h in idh)



def test_a_target_no_hand_makes_is_an_error_not_an_endless_draw():
    # ID cards are worth at most 10, so 10**4 is the largest target one can make; rare draws still come
    assert sorted(cards.sample_hand(random.Random(0), "id", target=10_000).numbers) == [10, 10, 10, 10]
    with pytest.raises(ValueError, match="no hand of four cards makes 10001 under the id rule.*data.target"):
        cards.sample_hand(random.Random(0), "id", target=10_001)
    assert cards._reachable("ood", 13**4)  # OOD cards are worth up to 13

PROMPT_ID = """
[Task Description]
You are an expert 24 points card game player. You will receive a set of 4 cards.
Note that 'J', 'Q', and 'K' count as '10'., and each card must be used once.
Your goal is to output a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', '/', '(', ')', and '='.

[Input]
Cards: ['A', '3', 'K', '10']

[Output]
{
  "cards": [x, y, z, w], where 'J', 'Q', and 'K' count as '10'.,
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals 24',
}

"""


def test_prompt_text_for_both_rules_character_for_character():
    assert cards.prompt_text(["A", "3", "K", "10"], "id") == PROMPT_ID
    ood_face = "'J', 'Q', and 'K' count as '11', '12', and '13' respectively."
    expected_ood = PROMPT_ID.replace("'J', 'Q', and 'K' count as '10'.", ood_face)
    assert expected_ood.count(ood_face) == 2
    assert cards.prompt_text(["A", "3", "K", "10"], "ood") == expected_ood
    messages = cards.prompt_messages(Hand(("A", "3", "K", "10"), "id"))
    assert messages == [{"role": "user", "content": PROMPT_ID}]


def test_answer_text_is_the_spec_format_and_grades_correct():
    hand = Hand(("A", "3", "K", "10"), "id")
    answer = cards.answer_text(hand, "10+10+3+1")
    assert answer == ('{\n  "cards": [\'A\', \'3\', \'K\', \'10\'],\n  "number": [1, 3, 10, 10],\n'
                      '  "formula": "10+10+3+1=24",\n}')
    assert parse_formula(answer) == "10+10+3+1"
    assert grade_answer(answer, hand.numbers).status == "CORRECT"
    ood = Hand(("A", "3", "K", "10"), "ood")
    assert '"number": [1, 3, 13, 10]' in cards.answer_text(ood, "13+10+1")


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, formula", [
    ('{"cards": ["A"], "number": [1], "formula": "1+2=24"}', "1+2"),  # valid JSON
    ('{\n  "formula": "(3+5)*3=24",\n}', "(3+5)*3"),  # trailing comma: the regex fallback
    ('blah "formula": "12*2" more', "12*2"),  # no '=': the whole formula
    ("no formula at all", "None"),  # upstream's sentinel
    ('{"formula": 24}', "24"),  # a non-string formula is read as its JSON text
    ('{"formula": "1=2=3"}', "1"),
])
def test_parse_formula(text, formula):
    assert parse_formula(text) == formula


# -------------------------------------------------------------------------------------- reward table
@pytest.mark.parametrize("formula, numbers, status, reward, message", [
    ("10+10+3+1", [1, 3, 10, 10], "CORRECT", 5, "Correct solution."),
    ("(10+10+3+1)", [1, 3, 10, 10], "CORRECT", 5, "Correct solution."),
    ("8/(3-8/3)", [3, 3, 8, 8], "CORRECT", 5, "Correct solution."),  # exact arithmetic
    ("(8+8)*(3/3", [3, 3, 8, 8], "NO_SOLUTION", -1,  # not evaluable and no solution starts so
     "your formula does not match any solution."),
    ("8/(3-8/3", [3, 3, 8, 8], "PARTIAL", 1, "partial solution."),  # a prefix of a solution
    ("10+10+3*1", [1, 3, 10, 10], "NO_SOLUTION", -1,
     "10+10+3 is partially correct but the full formula does not match any solution."),
    ("1*3*10-10", [1, 3, 10, 10], "NO_SOLUTION", -1,
     "1 is partially correct but the full formula does not match any solution."),
    ("3*8-8+3", [3, 3, 8, 8], "NO_SOLUTION", -1, "your formula does not match any solution."),
    # the prefix is upstream's: its solver wrote (2+10)*2... with brackets that `solve` leaves out
    ("((2+10)+10)*2", [2, 2, 10, 10], "NO_SOLUTION", -1,
     "( is partially correct but the full formula does not match any solution."),
    ("10+(2*2/10)", [2, 2, 10, 10], "NO_SOLUTION", -1,
     "10+(2*2 is partially correct but the full formula does not match any solution."),
    ("10+11+3", [1, 3, 10, 10], "INCORRECT_NUMBER", -4,
     "you used invalid numbers: [11], you didn't use numbers: [1, 10]."),
    ("10+10+10+3", [1, 3, 10, 10], "INCORRECT_NUMBER", -4,
     "you used numbers: [10] too many times, you didn't use numbers: [1]."),
    ("10+10+3", [1, 3, 10, 10], "INCORRECT_NUMBER", -2, "you didn't use numbers: [1]."),
    ("", [1, 3, 10, 10], "INCORRECT_NUMBER", -2, "you didn't use numbers: [1, 3, 10]."),
    ("10 + 10 + 3 + 1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3, "illegal characters."),
    ("10+10+3+1=24", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3, "illegal characters."),
    ("10++10+3+1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3, "invalid sequence after operator."),
    # upstream skips the bookkeeping of a misplaced '(' or ')', so one slip can cost twice
    ("(10+10)(3+1)", [1, 3, 10, 10], "ILLEGAL_FORMULA", -6,
     "invalid sequence before '(', unmatched closing parenthesis."),
    ("10+10)+3+1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3, "unmatched closing parenthesis."),
    ("-10+10+3+1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3, "invalid sequence after operator."),
    ("()10+10+3+1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -6,
     "invalid sequence after ')', invalid sequence after number."),
    # penalties add up, as upstream: two sequence errors and an invalid number.
    ("11**2++1", [1, 3, 10, 10], "ILLEGAL_FORMULA", -3 - 3 - 2 - 2,
     "invalid sequence after operator, invalid sequence after operator, "
     "you used invalid numbers: [11, 2], you didn't use numbers: [3, 10]."),
])
def test_reward_table(formula, numbers, status, reward, message):
    verdict = verify_formula(formula, numbers)
    assert (verdict.status, verdict.reward, verdict.message) == (status, reward, message)
    assert verdict.feedback == "You failed this trial because " + message
    assert verdict.correct == (status == "CORRECT")


def test_ood_rule_numbers_are_checked_against_the_hand():
    hand = Hand(("K", "Q", "2", "A"), "ood")  # 13, 12, 2, 1
    assert verify_formula("(13-1)*2*12", hand.numbers).status == "NO_SOLUTION"  # 288
    assert verify_formula("(13-1)*2*2", hand.numbers).status == "INCORRECT_NUMBER"
    assert verify_formula("(13-12+1)*2", hand.numbers).status == "NO_SOLUTION"
    assert verify_formula("12*(13-1)/2", hand.numbers).status == "NO_SOLUTION"  # 72
    correct = solve(hand.numbers)[0]
    assert verify_formula(correct, hand.numbers).status == "CORRECT"
    assert verify_formula(correct.replace("13", "10"), hand.numbers).message.startswith("you used invalid numbers: [10]")


# -------------------------------------------------------------------------------------- hostile input
HOSTILE = {
    "empty": "",
    "one megabyte of digits and plus": "1+" * 500_000,
    "one megabyte of one number": "9" * 1_000_000,
    "ten thousand nested parentheses, correct inside": "(" * 10_000 + "10+10+3+1" + ")" * 10_000,
    "ten thousand unbalanced parentheses": "(" * 10_000 + "10+10+3+1",
    "unicode digits": "١٠+١٠+٣+١",
    "fullwidth digits": "１０+１０+３+１",
    "power": "10**1+10+3+1",
    "names": "ten+ten+three+one",
    "import": "__import__('os').system('echo pwned')",
    "lambda": "(lambda: 24)()",
    "division by zero": "3/(10-10)+1",
    "division by zero everywhere": "(10-10)/(3-3)/1",
    "unbalanced close": "10+10+3+1)",
    "leading zero": "010+10+3+1",
    "nul and newline": "10+10\x00+3+1\n",
    "only operators": "+-*/" * 1000,
    "only parentheses": "()" * 5000,
    "float": "10.0+10+3+1",
    "huge number": "10+10+3+1" + "0" * 5000,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_gets_a_verdict(name):
    formula = HOSTILE[name]
    verdict = verify_formula(formula, [1, 3, 10, 10])
    assert verdict.status in STATUSES
    assert verdict.reward == verdict.reward  # a number, not NaN
    assert len(verdict.message) < 2_000  # a huge input never turns into a huge feedback turn
    assert grade_answer('{"formula": "%s"}' % formula[:10_000], [1, 3, 10, 10]).status in STATUSES


def test_hostile_inputs_that_are_really_formulas_are_judged_exactly():
    assert verify_formula(HOSTILE["ten thousand nested parentheses, correct inside"], [1, 3, 10, 10]).correct
    assert verify_formula(HOSTILE["division by zero"], [1, 3, 10, 10]).status == "NO_SOLUTION"
    assert verify_formula(HOSTILE["unicode digits"], [1, 3, 10, 10]).status == "ILLEGAL_FORMULA"
    assert verify_formula(HOSTILE["leading zero"], [1, 3, 10, 10]).status == "NO_SOLUTION"


@pytest.mark.timeout(300)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formula=st.one_of(
    st.text(max_size=200),
    st.text(alphabet="0123456789+-*/() =", max_size=60),
    st.lists(st.sampled_from(["1", "3", "10", "10", "+", "-", "*", "/", "(", ")"]), max_size=25).map("".join),
), numbers=st.lists(st.integers(1, 13), min_size=4, max_size=4))
def test_fuzz_verify_never_raises(formula, numbers):
    verdict = verify_formula(formula, numbers)
    assert verdict.status in STATUSES
    assert verdict.reward <= 5
    if verdict.status == "CORRECT":
        assert verdict.reward == 5
        assert sorted(int(t) for t in cards._TOKEN_RE.findall(formula) if t.isdigit()) == sorted(numbers)
    assert grade_answer(formula, numbers).status in STATUSES


# ------------------------------------------------------------------------------------------ episodes
HAND = Hand(("A", "3", "K", "10"), "id")
RIGHT = cards.answer_text(HAND, "10+10+3+1")
WRONG = cards.answer_text(HAND, "10+10+3*1")


def scripted(*answers_per_call):
    """A generate() that answers call i with answers_per_call[i] and records what it was asked."""
    calls = []

    def generate(conversations):
        calls.append(conversations)
        return [answers_per_call[len(calls) - 1]] * len(conversations)

    return generate, calls


def test_episode_correct_on_third_attempt():
    generate, calls = scripted(WRONG, WRONG, RIGHT, RIGHT, RIGHT)
    (episode,) = cards.run_episodes(generate, [HAND])
    assert episode.success and len(episode.attempts) == 3 and len(calls) == 3
    assert [a.verdict.status for a in episode.attempts] == ["NO_SOLUTION", "NO_SOLUTION", "CORRECT"]
    assert episode.rewards == [-1, -1, 5]
    roles = [m["role"] for m in episode.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert episode.messages[2]["content"] == (
        "You failed this trial because 10+10+3 is partially correct but the full formula does not match any solution.")
    # the model saw its own earlier answers and the feedback
    assert calls[2][0] == episode.messages[:5]


def test_episode_all_wrong_stops_after_max_attempts():
    generate, calls = scripted(*[WRONG] * 5)
    (episode,) = cards.run_episodes(generate, [HAND])
    assert not episode.success and len(episode.attempts) == 5 and len(calls) == 5
    (short,) = cards.run_episodes(scripted(*[WRONG] * 2)[0], [HAND], max_attempts=2)
    assert len(short.attempts) == 2


def test_malformed_output_is_graded_and_retried():
    generate, _ = scripted("I think the answer is 24!", '{"formula": "10 + 10 + 3 + 1"}', RIGHT)
    (episode,) = cards.run_episodes(generate, [HAND])
    assert [a.verdict.status for a in episode.attempts] == ["ILLEGAL_FORMULA", "ILLEGAL_FORMULA", "CORRECT"]


def test_batched_episodes_only_ask_for_unfinished_conversations():
    hands = [HAND, Hand(("3", "3", "8", "8"), "ood"), HAND]
    answers = iter([RIGHT, WRONG, WRONG, WRONG, RIGHT, WRONG, WRONG, WRONG, WRONG])
    sizes = []

    def generate(conversations):
        sizes.append(len(conversations))
        return [next(answers) for _ in conversations]

    episodes = cards.run_episodes(generate, hands, max_attempts=3)
    assert sizes == [3, 2, 1]
    assert [e.success for e in episodes] == [True, False, True]
    assert [len(e.attempts) for e in episodes] == [1, 3, 2]
    assert cards.success_rate(episodes) == pytest.approx(2 / 3)


def test_generate_returning_the_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="returned 0 texts for 1"):
        cards.run_episodes(lambda convs: [], [HAND])


# ------------------------------------------------------------------------------------ partial credit
def test_partial_credit_is_judged_by_the_arithmetic():
    hand = [10, 10, 10, 6]  # 10, J, 10, 6 under the ID rule
    # closing the parenthesis gives 10+(10+10-6) = 24 and (10-6+10+10) = 24: both are on their way to 24
    for formula in ("10+(10+10-6", "(10-6+10+10"):
        verdict = cards.verify_formula(formula, hand)
        assert (verdict.status, verdict.reward) == ("PARTIAL", 1.0), formula
    # unfinished but not completable to 24: 10+(10-10*6) = -40
    assert cards.verify_formula("10+(10-10*6", hand).status == "NO_SOLUTION"
    # a dangling operator cannot be completed without another number
    assert cards.verify_formula("10+10+10-6-", hand).status != "PARTIAL"


def test_episodes_give_the_feedback_of_the_chosen_partial_rule():
    """eval.partial_credit reaches the feedback turns: `(10-6+10+10` is PARTIAL by the arithmetic, and
    no solution by upstream's solver strings, so the next attempt reads another sentence."""
    from paper_lib import evaluate

    hand = Hand(("10", "J", "10", "6"), "id")
    answer = cards.answer_text(hand, "(10-6+10+10")
    feedback = {}
    for rule in cards.PARTIAL_CREDIT:
        generate, calls = scripted(answer, answer)
        (record,) = evaluate.play_hands(generate, [("id", 0, hand)], max_attempts=2, partial_credit=rule)
        feedback[rule] = calls[1][0][2]["content"]
        assert record["transcript"][0]["status"] == {"arithmetic": "PARTIAL", "upstream": "NO_SOLUTION"}[rule]
    assert feedback["arithmetic"] == "You failed this trial because partial solution."
    assert feedback["upstream"] != feedback["arithmetic"] and "does not match any solution" in feedback["upstream"]


def test_upstream_partial_credit_follows_its_solver_strings():
    hand = [10, 10, 10, 6]
    solutions = cards.upstream_solutions((6, 10, 10, 10))
    assert "10+(10+10-6)" in solutions and "(10-6+10+10)" not in solutions  # no bracket around the whole
    up = cards.verify_formula("10+(10+10-6", hand, partial_credit="upstream")
    assert (up.status, up.reward) == ("PARTIAL", 1.0)
    down = cards.verify_formula("(10-6+10+10", hand, partial_credit="upstream")
    assert (down.status, down.reward) == ("NO_SOLUTION", -1.0)
    # every upstream string is a correct formula, and it writes the double-bracket form too
    assert all(cards.verify_formula(s, [1, 2, 3, 4]).correct for s in cards.upstream_solutions((1, 2, 3, 4)))
    assert "(1+2)*(3+4)" not in cards.upstream_solutions((1, 2, 3, 4))  # 21, not 24
    assert "(4-2)*(3*4)" in cards.upstream_solutions((2, 3, 4, 4))
    with pytest.raises(ValueError, match="partial_credit must be one of"):
        cards.verify_formula("1+2", [1, 2], partial_credit="lenient")
