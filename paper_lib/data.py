"""The data of every stage, built deterministically from the preset and cached under runs/<preset>/data.

Splits (each row one hand; `prompt`/`completion` are TRL's conversational prompt-completion format):
- sft_train: ID-rule hands with a solver answer, `data.sft_size` rows, seed `data.seed`;
- id_test, ood_test: `data.test_size` hands per rule (234 in the paper), each drawn with seed
  `data.test_seed` (42), or (`data.test_hands: upstream`) the very hands upstream's evaluator played with
  it; the first `data.loss_set_size` rows of id_test give Figure 2's ID test loss;
- ood_loss: `data.loss_set_size` OOD hands with answers for Figure 2's OOD loss, seed `data.seed + 1`; in
  the SFT answer's format, or (`data.ood_loss_format: upstream`) in that of the authors' OOD loss data.
Hands repeat across splits as they do upstream: with 715 distinct ID multisets, a 100k-example SFT set
covers them all.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from tqdm.auto import tqdm

from . import artifacts, cards
from .config import Config

log = logging.getLogger(__name__)
SPLITS = ("sft_train", "id_test", "ood_test", "ood_loss")


def example(hand: cards.Hand, formula: str, target: int = cards.TARGET) -> dict[str, Any]:
    """One row: the hand, the prompt turn, and the SFT answer with `formula`."""
    return {
        "rule": hand.rule,
        "cards": list(hand.cards),
        "numbers": list(hand.numbers),
        "prompt": cards.prompt_messages(hand, target),
        "completion": [{"role": "assistant", "content": cards.answer_text(hand, formula, target)}],
        "formula": formula,
        "n_solutions": len(cards.solve(hand.numbers, target)),
    }


def sample_split(n: int, rule: str, seed: int, answer_choice: str = "random",
                 target: int = cards.TARGET, upstream_env: bool = False) -> list[dict[str, Any]]:
    """n hands of a rule from one seeded generator, each with a solver answer.

    answer_choice "random" draws the answer uniformly among all solutions from another seeded generator
    (upstream does not publish its choice); "first" takes the first in solve()'s order (shortest).
    upstream_env replays the hands upstream's evaluator played with `seed` (SFTvsRL base_evaluator.py:
    init_seed, then gym.make, whose constructor's reset draws a hand it never plays, then a reset per
    trajectory; every draw from Python's one `random` stream, as cards.sample_hand(env_draws=True)).
    """
    if answer_choice not in ("random", "first"):
        raise ValueError(f"data.answer_choice must be 'random' or 'first', got {answer_choice!r}")
    # Two streams, so that the answer choice never changes which hands are drawn (the test sets above all)
    rng, answer_rng = random.Random(seed), random.Random(f"answers-{seed}")
    if upstream_env:
        cards.sample_hand(rng, rule, target, env_draws=True)  # the constructor's hand
    rows = []
    for _ in tqdm(range(n), desc=f"{rule} hands (seed {seed})", disable=n < 2000, leave=False):
        hand = cards.sample_hand(rng, rule, target, env_draws=upstream_env)
        solutions = cards.solve(hand.numbers, target)
        formula = answer_rng.choice(solutions) if answer_choice == "random" else solutions[0]
        rows.append(example(hand, formula, target))
    return rows


# The authors' OOD loss data, which their Llama SFT evaluated (gp-l/ood-data.json, written by RL_Heals_SFT
# evaluation/launcher.py, generate_ood_dataset): a prompt worded apart from the benchmark's, and an answer
# framed by newlines, its numbers as strings, its formula without "=24" or a trailing comma.
UPSTREAM_OOD_PROMPT = (
    "\n[Task Description]\n"
    "You are an expert {target} points card game player. You will receive a set of 4 cards.\n"
    "Note that 'J', 'Q', and 'K' count as '11', '12', '13', and each card must be used once.\n"
    "Your goal is to output a formula that evaluates to {target} using numbers from the cards and operators "
    "such as '+', '-', '*', '/', '(', ')', and '='.\n\n"
    "[Input]\nCards: {cards}\n\n"
    "[Output]\n{{\n"
    "  \"cards\": [x, y, z, w], where 'J', 'Q', and 'K' count as '11','12','13',\n"
    "  \"number\": [a, b, c, d], where a, b, c, and d are the numbers on the cards,\n"
    "  \"formula\": 'an equation that equals {target}',\n"
    "}}\n\n")
UPSTREAM_OOD_ANSWER = '\n{{\n  "cards": {cards},\n  "number": {numbers},\n  "formula": "{formula}"\n}}\n'


def upstream_ood_loss_split(n: int, seed: int, target: int = cards.TARGET) -> list[dict[str, Any]]:
    """n distinct OOD hands (as ordered cards: the authors skipped a hand seen before) in the authors' OOD
    loss format, each answered with the first of its solutions, as they kept the first record."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        hand = cards.sample_hand(rng, "ood", target)
        if hand.cards in seen:
            continue
        seen.add(hand.cards)
        formula = cards.solve(hand.numbers, target)[0]
        row = example(hand, formula, target)
        row["prompt"] = [{"role": "user", "content": UPSTREAM_OOD_PROMPT.format(target=target, cards=list(hand.cards))}]
        row["completion"] = [{"role": "assistant", "content": UPSTREAM_OOD_ANSWER.format(
            cards=list(hand.cards), numbers=[str(x) for x in hand.numbers], formula=formula)}]
        rows.append(row)
    return rows


def build_splits(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    d = cfg.data
    replay = d.test_hands == "upstream"
    return {
        "sft_train": sample_split(d.sft_size, "id", d.seed, d.answer_choice, d.target),
        "id_test": sample_split(d.test_size, "id", d.test_seed, d.answer_choice, d.target, upstream_env=replay),
        "ood_test": sample_split(d.test_size, "ood", d.test_seed, d.answer_choice, d.target, upstream_env=replay),
        "ood_loss": (upstream_ood_loss_split(d.loss_set_size, d.seed + 1, d.target) if d.ood_loss_format == "upstream"
                     else sample_split(d.loss_set_size, "ood", d.seed + 1, d.answer_choice, d.target)),
    }


def build(cfg: Config, force: bool = False) -> Path:
    """Build (or reuse) every split under runs/<preset>/data; returns that directory."""
    spec = {"stage": "data", "data": asdict(cfg.data), "code": artifacts.code_hash("data")}

    def write(tmp: Path) -> None:
        splits = build_splits(cfg)
        datasets.disable_progress_bars()  # one bar per tiny split is noise
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(tmp))
        log.info("data: %s", {k: len(v) for k, v in splits.items()})

    return artifacts.cached_stage(artifacts.data_dir(cfg), spec, write, force=force)


def load(cfg: Config) -> datasets.DatasetDict:
    """Every split, building them first if needed."""
    path = build(cfg)
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:  # e.g. a truncated .arrow file: one line, and the fix
        raise ValueError(f"the data in {path} is unreadable ({err.__class__.__name__}: {str(err)[:200]}); "
                         f"move it aside and rerun notebooks/01_data.py (./run_all.sh {cfg.preset} --only 1)") from None


def split_sizes(splits: datasets.DatasetDict) -> pd.DataFrame:
    return pd.DataFrame([
        {"split": name, "rule": ds[0]["rule"] if len(ds) else "", "hands": len(ds),
         "distinct hands": len({tuple(sorted(c)) for c in ds["cards"]})}
        for name, ds in splits.items()
    ])


def solvable_share(rule: str, target: int = cards.TARGET) -> float:
    """Exact share of upstream's raw draws (before resampling) that are solvable under the rule:
    all 13^4 ordered ID draws, or all 13^3 x 3 OOD draws."""
    if rule == "id":
        draws = Counter(tuple(sorted(min(r, 10) for r in (a, b, c, d)))
                        for a in range(1, 14) for b in range(1, 14) for c in range(1, 14) for d in range(1, 14))
    else:
        draws = Counter(tuple(sorted((a, b, c, d)))
                        for a in range(1, 14) for b in range(1, 14) for c in range(1, 14) for d in range(11, 14))
    solvable = sum(n for hand, n in draws.items() if cards.is_solvable(hand, target))
    return solvable / sum(draws.values())
