"""paper_lib.rollout: a batched answer is the one its prompt gets alone, the repetition penalty included."""
from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from paper_lib import config, models
from paper_lib.rollout import Generator, RowRepetitionPenalty


def test_the_row_penalty_is_transformers_penalty_on_each_unpadded_row():
    pad, penalty = 0, 1.7
    batch = torch.tensor([[pad, pad, 3, 4, 3], [5, 6, 7, 3, 1]])
    scores = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    scores[0, pad] = 2.0  # the pad token: transformers' penalty would lower it in row 0
    ours = RowRepetitionPenalty(penalty, torch.tensor([2, 0]))(batch, scores.clone())
    alone = RepetitionPenaltyLogitsProcessor(penalty)
    assert torch.equal(ours[0], alone(batch[:1, 2:], scores[:1].clone())[0])
    assert torch.equal(ours[1], alone(batch[1:], scores[1:].clone())[0])
    assert alone(batch[:1], scores[:1].clone())[0, pad] < ours[0, pad] == 2.0  # what padding cost before


class _PaddingBlindPenalty(RepetitionPenaltyLogitsProcessor):
    """generate's own penalty as transformers < 5.23 built it (the GPU image has 5.17): the padding counts."""

    def __init__(self, penalty, prompt_ignore_length=None):
        super().__init__(penalty)


def test_a_padded_prompt_generates_what_it_generates_alone(tiny_base, monkeypatch):
    """The short prompt's greedy answer alone begins with token t; padded with t beside a longer prompt,
    under a strong penalty, it begins with t still, even where generate's own penalty counts the padding
    (transformers < 5.23: it then gave another token)."""
    import transformers.generation.utils as generation
    monkeypatch.setattr(generation, "RepetitionPenaltyLogitsProcessor", _PaddingBlindPenalty)
    cfg = config.load("tiny")
    model, tok = models.load(cfg)
    short = [{"role": "user", "content": "Cards: 1, 2"}]
    long = [{"role": "user", "content": "Cards: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, and then some more text"}]
    kwargs = dict(max_new_tokens=6, temperature=0.0, batch_size=2, repetition_penalty=1e3)
    alone = Generator(model, tok, **kwargs).generate_tokens([short])[0]
    first = alone.response_ids[0]
    assert first not in alone.prompt_ids
    tok.pad_token = tok.convert_ids_to_tokens(first)
    together = Generator(model, tok, **kwargs).generate_tokens([short, long])
    assert len(together[1].prompt_ids) > len(together[0].prompt_ids)  # the short one was padded
    assert together[0].response_ids == alone.response_ids
