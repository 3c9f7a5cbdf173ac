"""Batched generation for the multi-turn episodes: a `generate(conversations) -> texts` for
`cards.run_episodes`, shared by evaluation and RL.

Conversations are rendered with the model's chat template (generation prompt added), sorted by length
so a batch wastes little padding, left-padded, and generated with the KV cache. Only the new tokens are
decoded. The repetition penalty counts each row's own tokens, not its padding (`RowRepetitionPenalty`), so
a batched answer is the one its prompt would get alone, as upstream generated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .cards import TEMPLATE_KWARGS, Conversation


class RowRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (CTRL's: a seen token's logit divided by `penalty`, or multiplied
    when negative) over each row's own tokens. transformers before 5.23 (the GPU image has 5.17) penalised
    a left-padded row's padding too, and Qwen's pad token is one of its stop tokens, so a row's answer
    depended on its batch; 5.23 skips the padding itself. This does so on every version this project
    allows. `pad_lengths[row]` is that row's padding; each pad position is read as the row's first real
    token, which is penalised anyway, so the padding adds nothing."""

    def __init__(self, penalty: float, pad_lengths: torch.Tensor):
        self.penalty, self.pad_lengths = penalty, pad_lengths

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        starts = self.pad_lengths.to(input_ids.device)[:, None]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        ids = torch.where(positions < starts, input_ids.gather(1, starts), input_ids)
        seen = scores.gather(1, ids)
        return scores.scatter(1, ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]
    text: str


def model_sampling(model) -> dict:
    """The sampling settings of a checkpoint's own generation_config (upstream's evaluator used these:
    Qwen2.5-7B-Instruct samples at T 0.7, top_p 0.8, top_k 20). A setting the file leaves out takes
    transformers 4.x's default, under which upstream ran: T 1, top_p 1, top_k 50 (Llama-3.2-Vision sets
    no top_k; transformers 5.x would leave it off). repetition_penalty is left out: the caller sets it."""
    gen = model.generation_config
    return {"do_sample": True, "temperature": gen.temperature if gen.temperature is not None else 1.0,
            "top_p": gen.top_p if gen.top_p is not None else 1.0, "top_k": gen.top_k if gen.top_k is not None else 50}


class Generator:
    """Callable `generate(conversations) -> texts` over an HF causal LM and its tokenizer.

    temperature 0 is greedy decoding; above 0, sampling at that temperature (top-p 1, top-k off).
    `sampling` (e.g. `model_sampling(model)`) replaces both. repetition_penalty is always passed, so the
    checkpoint's generation_config never sets it silently.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 0.0, batch_size: int = 32,
                 progress: bool = False, repetition_penalty: float = 1.0, sampling: dict | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before generating")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size, self.progress = batch_size, progress
        self.sampling = sampling if sampling is not None else (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        self.sampling = {**self.sampling, "repetition_penalty": repetition_penalty}
        self.calls = 0  # generate() calls so far; one per attempt round of a batch of episodes

    def render(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                  **TEMPLATE_KWARGS)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate_tokens(self, conversations: list[Conversation]) -> list[Generation]:
        prompts = [self.render(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        eos = self._stop_ids()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="generate", disable=not self.progress, leave=False):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            sampling, penalty = {**self.sampling, "repetition_penalty": 1.0}, self.sampling["repetition_penalty"]
            padding = torch.tensor([width - len(prompts[i]) for i in batch])
            # before the temperature and top-k/top-p warpers, where transformers applies its own penalty
            processors = LogitsProcessorList([RowRepetitionPenalty(penalty, padding)] if penalty != 1.0 else [])
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=self.max_new_tokens,
                pad_token_id=pad, eos_token_id=eos, use_cache=True, logits_processor=processors, **sampling)
            for row, i in enumerate(batch):
                response = out[row, width:].tolist()
                for k, token in enumerate(response):  # cut at the first stop token, keep it
                    if token in eos:
                        response = response[:k + 1]
                        break
                text = self.tokenizer.decode(response, skip_special_tokens=True)
                results[i] = Generation(prompts[i], response, text)
        self.calls += 1
        return results  # type: ignore[return-value]

    def __call__(self, conversations: list[Conversation]) -> list[str]:
        return [g.text for g in self.generate_tokens(conversations)]

    def _stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids
