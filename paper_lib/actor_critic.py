"""The paper's PPO (Chu et al.'s recipe, PAPER_SPEC 4), piece by piece: the rollouts (episode slots played
in lockstep), the critic on the policy's last hidden state, the action log-probabilities at the sampling
temperature with the thought tokens down-weighted, GAE over attempts and the clipped losses. ppo.py runs
them as the RL stage.
"""
from __future__ import annotations

import bisect
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import cards

THOUGHT_KEY = '"formula"'  # tokens before its last occurrence are the "thought" (upstream)
# Upstream's fallback where its key ids did not match (rl/trainer/model_tz_llama.py, evaluate): the action
# begins one before the 4th-last response token, so the last 5 tokens count at weight 1.
ACTION_TAIL = 5
STEP_LIMIT_REWARD = -1.0  # upstream's answer past the last attempt ("step_limit_reached"), rl.episode_end "upstream"


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_values: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation.

    rewards, values, dones: [T, E], step t of env slot e; dones[t, e] = 1 when the episode ended with that
    step (the slot's next state is a new hand: nothing is bootstrapped across it). next_values: [E], the
    value of each slot's state after its last step.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_values)
    for t in reversed(range(rewards.shape[0])):
        following = next_values if t == rewards.shape[0] - 1 else values[t + 1]
        alive = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
    return advantages, advantages + values


LOG_RATIO_CAP = 40.0  # e^40 ~ 2e17: far past the ratio of 10 where the loss stops depending on it


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (policy loss, value loss, clipped?) of upstream's PPO, for sequence-level log-probs."""
    # Past a ratio of 10 the loss has no gradient (below), so capping the log-ratio changes nothing but
    # keeps exp finite: at exp = inf its backward is 0 * inf = NaN, and one such sample would poison Adam.
    ratio = torch.exp((logp - old_logp).clamp(max=LOG_RATIO_CAP))
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    # A sequence-level ratio multiplies over hundreds of tokens and can explode; past 10 upstream keeps
    # only the clipped term (after TRL's old PPO), so one runaway sample cannot dominate the step.
    policy = torch.where(ratio > 10, -surr2, -torch.min(surr1, surr2))
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value, (ratio - 1).abs() > clip_eps


def thought_weights(tokenizer: Any, response_ids: list[int], coef: float, split: str = "formula_key",
                    scored: str = "all") -> list[float]:
    """Weight of each response token in the action's log-probability: coef for the "thought", 1 for the
    action (rl.thought_split). "formula_key": the thought is the tokens wholly before the last `"formula"`
    key, the action runs from the token that holds its opening quote (upstream, where its key ids matched);
    an answer without the key, and every answer under "last_tokens", takes upstream's fallback: the last
    ACTION_TAIL tokens are the action. rl.scored_tokens "upstream" then drops what upstream's slicing
    dropped (upstream_scored)."""
    n = len(response_ids)
    start = _key_start(tokenizer, response_ids) if split == "formula_key" else None
    if scored == "upstream":
        return upstream_scored(response_ids, start if start is not None else _upstream_tail_start(response_ids), coef)
    if start is None:
        start = max(n - ACTION_TAIL, 0)
    return [coef] * start + [1.0] * (n - start)


def _key_start(tokenizer: Any, response_ids: list[int]) -> int | None:
    """Index of the token that holds the opening quote of the last `"formula"` key; None without one."""
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    key = text.rfind(THOUGHT_KEY)
    if key < 0:
        return None
    # The first token whose decoded prefix reaches the key's first character (prefix lengths only grow).
    return bisect.bisect_left(range(len(response_ids)), key + 1,
                              key=lambda k: len(tokenizer.decode(response_ids[:k + 1], skip_special_tokens=True)))


# Upstream's mask for padding, `output_ids != 0`. Id 0 is '!' in Llama-3's and Qwen2.5's vocabularies, so an
# answer's '!' went unscored too.
UPSTREAM_MASKED_ID = 0


def _upstream_tail_start(response_ids: list[int]) -> int | None:
    """Upstream's fallback action start: one before the 4th-last scored token of id != 0 (n - 5 when none is
    0); None where fewer than 4 are left, where upstream returned a constant log-prob (no gradient)."""
    kept = [k for k in range(1, len(response_ids)) if response_ids[k] != UPSTREAM_MASKED_ID]
    return kept[-4] - 1 if len(kept) >= 4 else None


def upstream_scored(response_ids: list[int], start: int | None, coef: float) -> list[float]:
    """Weights as upstream's slicing gave them (SFTvsRL rl/trainer/model_tz_llama.py, evaluate). Its row of
    log-probs starts at the second response token (row[j] scores token j + 1: the first is never scored);
    the thought is row[1:start - 1] (the second token neither), the action row[start - 1:], with Python's
    negative indices where start < 1; tokens of id UPSTREAM_MASKED_ID weigh 0. start None: all 0."""
    weights = [0.0] * len(response_ids)
    if start is None:
        return weights
    row = range(len(response_ids) - 1)
    for j in row[1:start - 1]:
        weights[j + 1] = coef
    for j in row[start - 1:]:
        weights[j + 1] = 1.0
    return [0.0 if token == UPSTREAM_MASKED_ID else w for w, token in zip(weights, response_ids)]


def sequence_logp(token_logps: torch.Tensor, weights: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """An action's log-probability, Σᵢ wᵢ log pᵢ per row of [B, R] (weights 0 on padding; rl.logprob_dtype).
    "bfloat16" as upstream (model_tz_llama.py, evaluate): each log pᵢ rounded to bf16, the thought (w < 1)
    and the action (w = 1) summed apart in bf16, then coef·thought + action in bf16, so near a sum of -30
    the value moves in steps of 1/8: a ratio stays 1 or moves by at least e^(1/8), past a clip of 0.1."""
    if dtype == "float32":
        return (token_logps * weights).sum(1)
    if dtype != "bfloat16":
        raise ValueError(f"rl.logprob_dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    low = token_logps.to(torch.bfloat16)
    thought, action = (weights > 0) & (weights != 1), weights == 1  # padding has weight 0
    coef = weights.masked_fill(~thought, 0).amax(1).to(torch.bfloat16)  # the row's thought weight
    return (coef * (low * thought.to(low.dtype)).sum(1) + (low * action.to(low.dtype)).sum(1)).float()


class ValueHead(nn.Sequential):
    """Upstream's critic: h -> h/4 -> h/8 -> 1 with ReLUs."""

    def __init__(self, hidden_size: int):
        super().__init__(nn.Linear(hidden_size, hidden_size // 4), nn.ReLU(),
                         nn.Linear(hidden_size // 4, hidden_size // 8), nn.ReLU(), nn.Linear(hidden_size // 8, 1))
        self.hidden_size = hidden_size


def save_value_head(head: ValueHead, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"hidden_size": str(head.hidden_size)})


def load_value_head(path: str | os.PathLike) -> ValueHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        hidden = int(fh.metadata()["hidden_size"])
    head = ValueHead(hidden)
    head.load_state_dict(load_file(str(path)))
    return head


class ActorCritic(nn.Module):
    """The policy (an HF causal LM) and the value head on its last hidden state: one module, so that
    accelerate/DeepSpeed wrap, synchronise and checkpoint both."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, value_index, logits_to_keep):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          logits_to_keep=logits_to_keep, use_cache=False)
        hidden = out.hidden_states[-1][torch.arange(len(input_ids), device=input_ids.device), value_index]
        values = self.value_head(hidden.to(self.value_head[0].weight.dtype)).squeeze(-1)
        return out.logits, values.float()


def hidden_size(model: nn.Module) -> int:
    return model.config.get_text_config().hidden_size


@dataclass
class Step:
    """One attempt: the conversation so far (prompt) and the answer (response), with what PPO needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    weights: list[float]
    reward: float
    done: bool
    old_logp: float = 0.0
    old_value: float = 0.0
    ref_logps: list[float] = field(default_factory=list)  # per token, under the reference (or start) policy


def score(model: nn.Module, steps: list, temperature: float, pad_id: int, entropy: bool = False):
    """Per-token log-probabilities of each step's response at the sampling temperature, [B, R] (0 on
    padding), the response mask, the value of each prompt [B], and (optionally) per-token entropies."""
    device = next(model.parameters()).device
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in steps]
    width, span = max(lengths), max(len(s.response_ids) for s in steps)
    ids = torch.full((len(steps), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(steps), width), dtype=torch.long)
    targets = torch.zeros((len(steps), max(span, 1)), dtype=torch.long)
    response_mask = torch.zeros((len(steps), max(span, 1)))
    for i, s in enumerate(steps):  # right padding: positions need no adjustment
        ids[i, :lengths[i]] = torch.tensor(s.prompt_ids + s.response_ids)
        mask[i, :lengths[i]] = 1
        targets[i, :len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
        response_mask[i, :len(s.response_ids)] = 1
    first = min(len(s.prompt_ids) for s in steps) - 1  # earliest position whose logits are needed
    value_index = torch.tensor([len(s.prompt_ids) - 1 for s in steps])
    logits, values = model(ids.to(device), mask.to(device), value_index.to(device), width - first)
    # logits row r is sequence position first + r; the token at position p is predicted at p - 1. Every
    # response token is scored; the weights pick which count (rl.scored_tokens "upstream" drops the first two).
    rows = torch.tensor([[min(len(s.prompt_ids) - 1 + j, lengths[i] - 1) - first for j in range(targets.shape[1])]
                         for i, s in enumerate(steps)], device=device)
    picked = logits[torch.arange(len(steps), device=device)[:, None], rows].float() / temperature
    logprobs = torch.log_softmax(picked, dim=-1)
    response_mask = response_mask.to(device)
    token_logps = logprobs.gather(-1, targets.to(device)[..., None]).squeeze(-1) * response_mask
    ent = -(logprobs.exp() * logprobs).sum(-1) * response_mask if entropy else None
    return token_logps, response_mask, values, ent


def pad_rows(rows: list[list[float]], shape: tuple[int, int], device) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out.to(device)


def k3_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of a KL, r - 1 - log r with log r = log q - log p on tokens sampled from p:
    unbiased and never negative."""
    log_ratio = log_ratio * mask
    return (log_ratio.exp() - 1 - log_ratio) * mask


class Rollouts:
    """`envs` episode slots played in lockstep, one attempt per slot per round; hands from the ID rule
    with a seeded RNG. Episodes still running at the end of an update carry over to the next."""

    def __init__(self, envs: int, seed: int, max_attempts: int, target: int,
                 grade: Callable[[cards.Hand, str], cards.Verdict], episode_end: str = "terminal"):
        self.rng = random.Random(seed)
        self.max_attempts, self.target, self.grade = max_attempts, target, grade
        self.step_past_limit = episode_end == "upstream"  # rl.episode_end
        self.slots = [self._new() for _ in range(envs)]

    def _new(self) -> cards.Episode:
        return cards.start_episode(cards.sample_hand(self.rng, "id", self.target), self.target)

    def collect(self, generator, rounds: int, coef: float, split: str = "formula_key", scored: str = "all"
                ) -> tuple[list[list[Step]], list[cards.Episode]]:
        """rounds x envs steps, and the episodes that ended meanwhile (coef, split, scored: thought_weights)."""
        steps, finished = [], []
        for _ in range(rounds):
            row = []
            for e, generation in enumerate(generator.generate_tokens([list(ep.messages) for ep in self.slots])):
                episode = self.slots[e]
                weights = thought_weights(generator.tokenizer, generation.response_ids, coef, split, scored)
                if cards.is_finished(episode, self.max_attempts):  # upstream's answer past the limit: ungraded
                    row.append(Step(generation.prompt_ids, generation.response_ids, weights, STEP_LIMIT_REWARD, False))
                    finished.append(episode)
                    self.slots[e] = self._new()
                    continue
                verdict = cards.step_episode(episode, generation.text, self.target, self.grade).verdict
                # A correct attempt ends the episode; so does the last failed one, unless upstream's extra
                # answer follows it (a time limit, not an end: GAE bootstraps through it into the next hand).
                done = episode.success or (cards.is_finished(episode, self.max_attempts) and not self.step_past_limit)
                row.append(Step(generation.prompt_ids, generation.response_ids, weights, verdict.reward, done))
                if done:
                    finished.append(episode)
                    self.slots[e] = self._new()
            steps.append(row)
        return steps, finished

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "slots": self.slots}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.slots = state["slots"]
