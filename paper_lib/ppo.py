"""The RL stage (PAPER_SPEC 4): PPO from the full-SFT checkpoint, by Chu et al.'s recipe (repo SFTvsRL),
written on transformers + accelerate (TRL's PPOTrainer is gone and took neither a rule-based reward nor
multi-turn episodes).

    python -m paper_lib.ppo --preset tiny                      # one process: the CPU or one GPU
    accelerate launch --config_file configs/accelerate/zero2.yaml -m paper_lib.ppo --preset qwen7b
    ppo.run(cfg)                                               # from a notebook: one of the two, streamed

The recipe, as upstream:
- an *action* is one whole attempt. Its log-probability is the sum of its tokens' log-probabilities at the
  sampling temperature; tokens before the `"formula"` key (the "thought") count thought_prob_coef times;
- the critic is an MLP head (h -> h/4 -> h/8 -> 1) on the policy's last hidden state at the last prompt
  token, so V is the value of the conversation so far; policy and critic share the backbone;
- rollouts are the multi-turn episodes of 2.5: every attempt gets the reward of 2.4; env slots play in
  lockstep and a slot starts a new hand when its episode ends; an episode still running at the end of an
  update carries over to the next, and its value bootstraps the return;
- GAE(gamma, lambda) over attempts, advantages normalised per process, the clipped surrogate on the
  sequence-level ratio (only the clipped term once a ratio passes 10), a clipped value loss, loss =
  policy + value_coef * value; Adam (eps) with a cosine schedule stepped once per update; grad-norm clip.
Differences, each said where it is made: the last failed attempt of an episode is terminal (upstream
grades a sixth, ungraded "step_limit_reached" attempt at -1 and lets GAE run on into the next episode);
every response token counts (upstream drops the first two); one optimizer step per PPO epoch over the
process's whole batch (upstream accumulates a fixed 128 micro-steps); the cosine runs over num_updates.

`rl.algo: grpo` runs TRL's GRPOTrainer instead (single turn, the verifier's reward of the first attempt),
writing the same checkpoint layout, so the two algorithms can be compared.

Outputs under runs/<preset>/rl/: checkpoint-<update>/ (an HF checkpoint + value_head.safetensors; the
latest also holds trainer_state/ for resuming), metrics.csv (one row per update), manifest.json when done.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from . import artifacts, cards, config, launch, models
from .config import PROJECT_ROOT, Config

log = logging.getLogger(__name__)

THOUGHT_KEY = '"formula"'  # tokens before its last occurrence are the "thought" (upstream)
Grade = Callable[[cards.Hand, str], cards.Verdict]  # (hand, answer text) -> verdict with .reward


def verifier(target: int = cards.TARGET) -> Grade:
    """The reward of PAPER_SPEC 2.4 for one answer."""
    return lambda hand, text: cards.grade_answer(text, hand.numbers, target)


# ------------------------------------------------------------------------------------ the PPO pieces
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


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (policy loss, value loss, clipped?) of upstream's PPO, for sequence-level log-probs."""
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    # A sequence-level ratio multiplies over hundreds of tokens and can explode; past 10 upstream keeps
    # only the clipped term (after TRL's old PPO), so one runaway sample cannot dominate the step.
    policy = torch.where(ratio > 10, -surr2, -torch.min(surr1, surr2))
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value, (ratio - 1).abs() > clip_eps


def thought_weights(tokenizer: Any, response_ids: list[int], coef: float) -> list[float]:
    """Weight of each response token in the action's log-probability: coef for the tokens wholly before the
    last `"formula"` key, 1 from the token that holds its opening quote on (upstream). Without the key the
    whole answer is thought."""
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    key = text.rfind(THOUGHT_KEY)
    if key < 0:
        return [coef] * len(response_ids)
    # The first token whose decoded prefix reaches the key's first character (prefix lengths only grow).
    first = bisect.bisect_left(range(len(response_ids)), key + 1,
                               key=lambda k: len(tokenizer.decode(response_ids[:k + 1], skip_special_tokens=True)))
    return [coef] * first + [1.0] * (len(response_ids) - first)


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


# ------------------------------------------------------------------------------------------- rollouts
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
    # response token counts (upstream's slicing leaves the first out, and the second out of the thought).
    rows = torch.tensor([[min(len(s.prompt_ids) - 1 + j, lengths[i] - 1) - first for j in range(targets.shape[1])]
                         for i, s in enumerate(steps)], device=device)
    picked = logits[torch.arange(len(steps), device=device)[:, None], rows].float() / temperature
    logprobs = torch.log_softmax(picked, dim=-1)
    response_mask = response_mask.to(device)
    token_logps = logprobs.gather(-1, targets.to(device)[..., None]).squeeze(-1) * response_mask
    ent = -(logprobs.exp() * logprobs).sum(-1) * response_mask if entropy else None
    return token_logps, response_mask, values, ent


def _pad(rows: list[list[float]], shape: tuple[int, int], device) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out.to(device)


def _k3(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of a KL, r - 1 - log r with log r = log q - log p on tokens sampled from p:
    unbiased and never negative."""
    log_ratio = log_ratio * mask
    return (log_ratio.exp() - 1 - log_ratio) * mask


class Rollouts:
    """`envs` episode slots played in lockstep, one attempt per slot per round; hands from the ID rule
    with a seeded RNG. Episodes still running at the end of an update carry over to the next."""

    def __init__(self, envs: int, seed: int, max_attempts: int, target: int, grade: Grade):
        self.rng = random.Random(seed)
        self.max_attempts, self.target, self.grade = max_attempts, target, grade
        self.slots = [self._new() for _ in range(envs)]

    def _new(self) -> cards.Episode:
        return cards.start_episode(cards.sample_hand(self.rng, "id", self.target), self.target)

    def collect(self, generator, rounds: int, coef: float) -> tuple[list[list[Step]], list[cards.Episode]]:
        """rounds x envs steps, and the episodes that ended meanwhile."""
        steps, finished = [], []
        for _ in range(rounds):
            row = []
            for e, generation in enumerate(generator.generate_tokens([list(ep.messages) for ep in self.slots])):
                episode = self.slots[e]
                verdict = self.grade(episode.hand, generation.text)
                # what cards.step_episode does, with a pluggable grade
                episode.attempts.append(cards.Attempt(generation.text, cards.parse_formula(generation.text), verdict))
                episode.messages.append({"role": "assistant", "content": generation.text})
                if not verdict.correct:
                    episode.messages.append({"role": "user", "content": verdict.feedback})
                # A correct attempt or the last failed one ends the episode, and nothing follows it (upstream
                # asks for a sixth, ungraded answer at -1 and, as a time limit, bootstraps into the next hand).
                done = cards.is_finished(episode, self.max_attempts)
                row.append(Step(generation.prompt_ids, generation.response_ids,
                                thought_weights(generator.tokenizer, generation.response_ids, coef),
                                verdict.reward, done))
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


# ------------------------------------------------------------------------------ checkpoints and specs
def init_checkpoint(cfg: Config, path: str | os.PathLike | None = None) -> Path:
    """Where PPO starts: `path` if given, else the full-SFT checkpoint, sft_dir/checkpoint-<full_sft_step>
    if it exists, else the last SFT checkpoint."""
    if path is not None:
        return models.checkpoint_path(path)
    found = artifacts.numbered_checkpoints(artifacts.sft_dir(cfg))
    if not found:
        raise FileNotFoundError(
            f"PPO starts from the full-SFT checkpoint, but {artifacts.sft_dir(cfg)} holds no SFT checkpoint "
            f"(checkpoint-N with config.json and *.safetensors). Run notebooks/02_sft.py first (or `python -m "
            f"paper_lib.sft --preset {cfg.preset}`), or pass init_checkpoint=PATH / --init-checkpoint PATH.")
    step = cfg.sft.full_sft_step if cfg.sft.full_sft_step in found else max(found)
    return found[step]


def checkpoints(cfg: Config) -> dict[int, Path]:
    """{update: path} of the RL checkpoints written so far."""
    return artifacts.numbered_checkpoints(artifacts.rl_dir(cfg))


def run_spec(cfg: Config, init: Path, grade_name: str = "verifier") -> dict:
    """What a finished run's manifest must match for it to be reused."""
    from .evaluate import fingerprint

    return {"stage": "rl", "rl": dataclasses.asdict(cfg.rl), "max_attempts": cfg.eval.max_attempts,
            "target": cfg.data.target, "init": str(init), "init_weights": fingerprint(init), "reward": grade_name,
            "code": artifacts.code_hash("ppo", "cards", "rollout", "models")}


def _prepare_dir(out: Path, spec: dict, force: bool) -> bool:
    """Make out ready for the run (main process only); False when a finished run matches."""
    if not force and artifacts.manifest_matches(out, spec):
        return False
    canon = json.loads(json.dumps(spec, sort_keys=True, default=str))
    spec_file = out / "run_spec.json"
    previous = json.loads(spec_file.read_text()) if spec_file.is_file() else None
    if out.exists() and (force or previous != canon):
        log.info("starting %s afresh (%s)", out, "force" if force else "its settings or code changed")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".checkpoint-*"):  # left by a run killed while saving
        shutil.rmtree(partial, ignore_errors=True)
    spec_file.write_text(json.dumps(canon, indent=2, sort_keys=True))
    return True


def _process_state():
    """accelerate's view of the processes, as Accelerator will see them (see launch.process_state)."""
    return launch.process_state()


def _start(out: Path, spec: dict, force: bool) -> bool:
    """Prepare out on the main process; every process learns whether there is work to do."""
    from accelerate.utils import broadcast_object_list

    state = _process_state()
    decision = [_prepare_dir(out, spec, force) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(decision)
    state.wait_for_everyone()
    if not decision[0]:
        log.info("%s is up to date (manifest matches); pass force=True to redo it", out)
    return bool(decision[0])


def _append_metrics(out: Path, row: dict) -> None:
    path = out / "metrics.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_metrics(out: Path, last_update: int) -> None:
    """Drop rows a killed run logged after its last checkpoint: they are redone."""
    path = out / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["update"]) <= last_update]
    path.unlink()
    for row in rows:
        _append_metrics(out, row)


# ------------------------------------------------------------------------------------------ training
def default_envs(cfg: Config) -> int:
    """Slots per process: the largest divisor of steps_per_update that leaves every slot at least
    max_attempts rounds, so each update sees whole episodes (upstream plays one slot per process)."""
    steps = cfg.rl.steps_per_update
    return max(d for d in range(1, steps + 1) if steps % d == 0 and steps // d >= min(cfg.eval.max_attempts, steps))


class PPOTrainer:
    """One PPO run under accelerate: the actor-critic, Adam and its schedule, the episode slots of this
    process, and the start policy's samples that measure how far the policy has moved."""

    def __init__(self, cfg: Config, init: Path, grade: Grade, envs: int, micro: int):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        from .rollout import Generator

        self.cfg, self.rl, self.envs, self.micro = cfg, cfg.rl, envs, micro
        self.rounds = self.rl.steps_per_update // envs
        self.n_micro = math.ceil(self.rl.steps_per_update / micro)
        # one optimizer step per PPO epoch: gradients accumulate (and synchronise) over its micro-batches
        self.accelerator = acc = Accelerator(cpu=launch.use_cpu(), gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.n_micro))
        if acc.state.deepspeed_plugin is not None:  # no dataloader tells DeepSpeed the batch; clip at the paper's norm
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=self.n_micro,
                gradient_clipping=self.rl.max_grad_norm)
        set_seed(self.rl.seed)  # the same value-head init on every process
        # Adam steps of lr 1e-6 vanish in bf16 weights: train in fp32 unless DeepSpeed keeps fp32 master weights
        dtype = None if acc.state.deepspeed_plugin is not None else "float32"
        policy, self.tokenizer = models.load(cfg, checkpoint=init, dtype=dtype, device=str(acc.device))
        policy.eval()  # no dropout: the ratio must compare one function with itself
        if self.rl.gradient_checkpointing:  # memory of the 7B/11B presets; the same gradients, more compute
            if getattr(policy.config, "attention_dropout", 0.0):
                raise ValueError("rl.gradient_checkpointing needs a model without dropout (HF checkpoints only in "
                                 "train mode); set rl.gradient_checkpointing: false")
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.train()  # HF recomputes only in train mode; without dropout it is the same function
        if acc.device.type == "cpu" and hidden_size(policy) <= 256:
            # a tiny model gains nothing from intra-op threads and loses much when another process holds a core
            torch.set_num_threads(1)
        model = ActorCritic(policy, ValueHead(hidden_size(policy)).to(acc.device))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.rl.learning_rate,
                                     eps=self.rl.adam_eps, weight_decay=0.0)
        # Stepped once per update, as upstream; not prepared, since accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(self.rl.num_updates, 1), eta_min=self.rl.min_learning_rate)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.unwrapped = acc.unwrap_model(self.model)  # for generation and no-grad passes
        self.ref = None
        if self.rl.kl_coef > 0:  # a frozen copy of the start policy for the KL penalty
            ref_policy, _ = models.load(cfg, checkpoint=init, device=str(acc.device))
            self.ref = ActorCritic(ref_policy, ValueHead(hidden_size(ref_policy))).to(acc.device).eval()
            self.ref.requires_grad_(False)
        self.rollouts = Rollouts(envs, self.rl.seed + acc.process_index, cfg.eval.max_attempts, cfg.data.target, grade)
        self.generator = Generator(self.unwrapped.policy, self.tokenizer, self.rl.max_new_tokens,
                                   self.rl.temperature, batch_size=envs)
        self.probe: list[Step] = []  # the first update's samples, with the start policy's log-probs
        set_seed(self.rl.seed + acc.process_index)  # different hands and samples per process (upstream: seed + rank)

    def _chunks(self, steps: list) -> list[list]:
        return [steps[i:i + self.micro] for i in range(0, len(steps), self.micro)]

    def _score(self, model, steps: list, entropy: bool = False):
        return score(model, steps, self.rl.temperature, self.tokenizer.pad_token_id, entropy)

    def resume(self, out: Path) -> int:
        """Load the newest checkpoint's trainer state, if any; the last finished update (0 if none)."""
        found = {u: p for u, p in artifacts.numbered_checkpoints(out).items() if (p / "trainer_state").is_dir()}
        if not found:
            return 0
        update = max(found)
        state = found[update] / "trainer_state"
        acc = self.accelerator
        if not (state / f"rollouts_{acc.process_index}.pkl").is_file() or (state / f"rollouts_{acc.num_processes}.pkl").is_file():
            raise ValueError(f"{found[update]} was written by another number of processes; resume with the same "
                             f"number, or pass force=True to start over")
        acc.load_state(str(state))  # weights, optimizer, schedule, every process's RNG
        with open(state / f"rollouts_{acc.process_index}.pkl", "rb") as fh:
            saved = pickle.load(fh)
        self.rollouts.load_state_dict(saved["rollouts"])
        self.probe = saved["probe"]
        log.info("resuming from %s (update %d of %d)", found[update], update, self.rl.num_updates)
        return update

    @torch.no_grad()
    def _rollout_pass(self, steps: list[Step]) -> tuple[float, float]:
        """Old log-probs and values of the rollout policy (the same code as the update, so the first ratio
        is 1); reference log-probs; the start policy's samples at the first update. (entropy sum, tokens)"""
        entropy = tokens = 0.0
        for chunk in self._chunks(steps):
            tok, mask, values, ent = self._score(self.unwrapped, chunk, entropy=True)
            logp = (tok * _pad([s.weights for s in chunk], tok.shape, tok.device)).sum(1)
            for s, lp, v, row in zip(chunk, logp.tolist(), values.tolist(), tok.tolist()):
                s.old_logp, s.old_value, s.ref_logps = lp, v, row[:len(s.response_ids)]
            entropy, tokens = entropy + ent.sum().item(), tokens + mask.sum().item()
        if not self.probe:  # first update: these samples come from the start policy
            self.probe = [dataclasses.replace(s) for s in steps]
        if self.ref is not None:
            for chunk in self._chunks(steps):
                for s, row in zip(chunk, self._score(self.ref, chunk)[0].tolist()):
                    s.ref_logps = row[:len(s.response_ids)]
        return entropy, tokens

    @torch.no_grad()
    def _next_values(self) -> torch.Tensor:
        """V of each slot's next state, which bootstraps the return of an episode that carries over."""
        boot = [Step(self.generator.render(ep.messages), [], [], 0.0, False) for ep in self.rollouts.slots]
        return torch.cat([self._score(self.unwrapped, chunk)[2].cpu() for chunk in self._chunks(boot)])

    def _optimise(self, steps: list[Step], advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """ppo_epochs passes over the batch in shuffled micro-batches, one optimizer step per pass."""
        acc, rl, n = self.accelerator, self.rl, len(steps)
        stats = dict(policy_loss=0.0, value_loss=0.0, clipped=0.0, samples=0.0, kl_ref=0.0, grad_norm=0.0)
        for _ in range(rl.ppo_epochs):
            order = torch.randperm(n).tolist()
            for idx in self._chunks(order):
                chunk = [steps[j] for j in idx]
                with acc.accumulate(self.model):
                    tok, mask, values, _ = self._score(self.model, chunk)
                    dev = tok.device
                    logp = (tok * _pad([s.weights for s in chunk], tok.shape, dev)).sum(1)
                    old = lambda name: torch.tensor([getattr(s, name) for s in chunk], device=dev)
                    pl, vl, clipped = ppo_loss(logp, old("old_logp"), advantages[idx].to(dev), values,
                                               old("old_value"), returns[idx].to(dev), rl.clip_eps)
                    loss = pl + rl.value_coef * vl  # no entropy bonus: upstream passes entropy_coef, never uses it
                    if self.ref is not None:  # KL(policy || reference) per token, as GRPO estimates it
                        ref_tok = _pad([s.ref_logps for s in chunk], tok.shape, dev)
                        kl = _k3(ref_tok - tok, mask).sum(1) / mask.sum(1).clamp(min=1)
                        loss = loss + rl.kl_coef * kl
                        stats["kl_ref"] += kl.sum().item()
                    # accelerate divides by n_micro, so the step's gradient is that of the batch mean
                    acc.backward(loss.sum() * self.n_micro / n)
                    if acc.sync_gradients:
                        norm = acc.clip_grad_norm_(self.model.parameters(), rl.max_grad_norm)
                        stats["grad_norm"] += float(norm) / rl.ppo_epochs if norm is not None else float("nan")
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                stats["policy_loss"] += pl.sum().item()
                stats["value_loss"] += vl.sum().item()
                stats["clipped"] += clipped.float().sum().item()
                stats["samples"] += len(chunk)
        return stats

    @torch.no_grad()
    def _drift(self) -> tuple[float, float]:
        """KL(start policy || policy), k3 per token on the start policy's own samples: (sum, tokens)."""
        total = tokens = 0.0
        for chunk in self._chunks(self.probe):
            tok, mask, _, _ = self._score(self.unwrapped, chunk)
            total += _k3(tok - _pad([s.ref_logps for s in chunk], tok.shape, tok.device), mask).sum().item()
            tokens += mask.sum().item()
        return total, tokens

    def update(self, number: int) -> dict:
        """Collect steps_per_update attempts, take ppo_epochs optimizer steps; the metrics of all processes."""
        rl, t0 = self.rl, time.time()
        table, finished = self.rollouts.collect(self.generator, self.rounds, rl.thought_prob_coef)
        rollout_seconds = time.time() - t0
        steps = [s for row in table for s in row]
        entropy, tokens = self._rollout_pass(steps)
        shape = (self.rounds, self.envs)
        rewards = torch.tensor([s.reward for s in steps]).view(shape)
        advantages, returns = gae(rewards, torch.tensor([s.old_value for s in steps]).view(shape),
                                  torch.tensor([float(s.done) for s in steps]).view(shape), self._next_values(),
                                  rl.gamma, rl.gae_lambda)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-5)  # per process, as upstream
        stats = self._optimise(steps, advantages.flatten(), returns.flatten())
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        drift, drift_tokens = self._drift()

        # sums over processes, then ratios
        local = [rewards.sum().item(), len(steps), len(finished), sum(e.success for e in finished),
                 sum(sum(e.rewards) for e in finished), sum(len(e.attempts) for e in finished),
                 stats["policy_loss"], stats["value_loss"], stats["clipped"], stats["samples"], stats["kl_ref"],
                 entropy, tokens, drift, drift_tokens, stats["grad_norm"],
                 sum(len(s.response_ids) for s in steps), rollout_seconds]
        t = self.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=self.accelerator.device), "sum").tolist()
        p, nan = self.accelerator.num_processes, float("nan")
        row = {
            "update": number, "mean_reward": t[0] / t[1],
            "success_rate": t[3] / t[2] if t[2] else nan, "episodes": int(t[2]), "attempts": int(t[1]),
            "episode_reward": t[4] / t[2] if t[2] else nan, "attempts_per_episode": t[5] / t[2] if t[2] else nan,
            "policy_loss": t[6] / t[9], "value_loss": t[7] / t[9], "clip_fraction": t[8] / t[9],
            "approx_kl": t[13] / max(t[14], 1), "entropy": t[11] / max(t[12], 1), "grad_norm": t[15] / p,
            "learning_rate": lr, "response_tokens": t[16] / t[1], "rollout_tokens_per_s": t[16] / max(t[17] / p, 1e-9),
            "rollout_seconds": t[17] / p, "seconds": time.time() - t0, "torch_threads": torch.get_num_threads(),
        }
        if self.ref is not None:
            row["kl_ref"] = t[10] / t[9]
        return row

    def save(self, out: Path, number: int) -> None:
        """Write checkpoint-<number> under a temporary name and rename it when complete, so a kill leaves the
        last complete checkpoint. Only the newest keeps trainer_state/ (optimizer shards are large)."""
        acc = self.accelerator
        tmp = out / f".checkpoint-{number}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "trainer_state"))  # weights, optimizer, schedule, every process's RNG
        with open(tmp / "trainer_state" / f"rollouts_{acc.process_index}.pkl", "wb") as fh:
            pickle.dump({"rollouts": self.rollouts.state_dict(), "probe": self.probe}, fh)
        if acc.is_main_process:
            self.unwrapped.policy.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            save_value_head(self.unwrapped.value_head, tmp / "value_head.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = out / f"checkpoint-{number}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for other, path in artifacts.numbered_checkpoints(out).items():
                if other != number:
                    shutil.rmtree(path / "trainer_state", ignore_errors=True)
            log.info("saved %s", final)
        acc.wait_for_everyone()


def train(cfg: Config, force: bool = False, init: str | os.PathLike | None = None, grade: Grade | None = None,
          envs: int | None = None, micro_batch_size: int | None = None, progress: bool = True) -> Path:
    """Run PPO for cfg, resuming from the last checkpoint of an interrupted run and skipping a finished one
    (force: start over); returns rl_dir. `grade(hand, text) -> Verdict` replaces the verifier (tests use an
    easy reward); envs: episode slots per process; micro_batch_size: attempts per forward/backward."""
    from tqdm.auto import tqdm

    rl = cfg.rl
    if rl.temperature <= 0:
        raise ValueError("rl.temperature must be > 0: PPO's log-probabilities are those of the sampling distribution")
    init_path = init_checkpoint(cfg, init)
    spec = run_spec(cfg, init_path, "verifier" if grade is None else getattr(grade, "__name__", "custom"))
    envs = envs or default_envs(cfg)
    if rl.steps_per_update % envs:
        raise ValueError(f"envs={envs} must divide rl.steps_per_update={rl.steps_per_update}")
    # Upstream backpropagates one attempt at a time (memory on big models); on CPU a few at once is faster.
    micro = micro_batch_size or (1 if torch.cuda.is_available() else 8)
    out = artifacts.rl_dir(cfg)
    main = _process_state().is_main_process
    if not main:  # one process reports
        for name in ("paper_lib", __name__):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not _start(out, spec, force):
        return out

    threads = torch.get_num_threads()  # the trainer may lower it for a tiny model; restored for the caller
    try:
        trainer = PPOTrainer(cfg, init_path, grade or verifier(cfg.data.target), envs, micro)
        start = trainer.resume(out)
        if main:
            _truncate_metrics(out, start)  # rows a killed run logged after its last checkpoint are redone
        log.info("PPO on %d process(es): %d slots x %d rounds = %d attempts per process per update, micro-batch "
                 "%d, %d updates from %s", trainer.accelerator.num_processes, envs, trainer.rounds,
                 rl.steps_per_update, micro, rl.num_updates, init_path)
        launch.report_processes("ppo", trainer.accelerator, f"{rl.steps_per_update} attempts per update "
                                f"(of {rl.steps_per_update * trainer.accelerator.num_processes} in all)")
        bar = tqdm(total=rl.num_updates, initial=start, desc="PPO updates", disable=not (main and progress))
        for number in range(start + 1, rl.num_updates + 1):
            row = trainer.update(number)
            if main:
                _append_metrics(out, row)
            bar.set_postfix(reward=f"{row['mean_reward']:.2f}", success=f"{row['success_rate']:.2f}")
            bar.update()
            log.info("update %d: %s", number, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "update"))
            if number % rl.save_every == 0 or number == rl.num_updates:
                trainer.save(out, number)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    if main:
        artifacts.write_manifest(out, spec)
    trainer.accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------------------------------------- GRPO
def train_grpo(cfg: Config, force: bool = False, init: str | os.PathLike | None = None,
               grade: Grade | None = None) -> Path:
    """TRL's GRPOTrainer on single-turn prompts (the reward of the first attempt), same rl_dir layout."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rl = cfg.rl
    init_path = init_checkpoint(cfg, init)
    grade_name = "verifier" if grade is None else getattr(grade, "__name__", "custom")
    grade = grade or verifier(cfg.data.target)
    out = artifacts.rl_dir(cfg)
    spec = run_spec(cfg, init_path, grade_name)
    if not _start(out, spec, force):
        return out
    model, tokenizer = models.load(cfg, checkpoint=init_path, dtype="float32", device=None)  # bf16: autocast
    # a step's completions: steps_per_update per process, in groups of `generations` per prompt
    total = rl.steps_per_update * rl.num_processes
    generations = next(g for g in (8, 4, 2, 1) if total % g == 0)
    rng = random.Random(rl.seed)
    hands = [cards.sample_hand(rng, "id", cfg.data.target) for _ in range(total // generations * rl.num_updates)]
    data = Dataset.from_list([{"prompt": cards.prompt_messages(h, cfg.data.target), "cards": list(h.cards)}
                              for h in hands])

    def reward(completions, cards_, log_metric=None, **_):
        verdicts = [grade(cards.Hand(tuple(c), "id"), comp[0]["content"]) for comp, c in zip(completions, cards_)]
        if log_metric is not None:
            log_metric("success_rate", sum(v.correct for v in verdicts) / len(verdicts))
        return [v.reward for v in verdicts]

    data = data.rename_column("cards", "cards_")  # the reward function's keyword must not shadow the module
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=rl.steps_per_update, num_generations=generations,
        max_completion_length=rl.max_new_tokens, temperature=rl.temperature, top_p=1.0, top_k=0,
        learning_rate=rl.learning_rate, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": rl.min_learning_rate}, warmup_steps=0, adam_epsilon=rl.adam_eps,
        weight_decay=0.0, max_grad_norm=rl.max_grad_norm, beta=rl.kl_coef, epsilon=rl.clip_eps,
        max_steps=rl.num_updates,  # an update: one batch of rollouts, one optimizer step (TRL's mu = 1)
        save_strategy="steps", save_steps=rl.save_every, logging_steps=1, seed=rl.seed, report_to="none",
        bf16=torch.cuda.is_available() and cfg.model.dtype == "bfloat16")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
    resumable = [p for p in checkpoints(cfg).values() if (p / "trainer_state.json").is_file()]
    trainer.train(resume_from_checkpoint=str(resumable[-1]) if resumable else None)
    if rl.num_updates not in checkpoints(cfg):
        trainer.save_model(str(out / f"checkpoint-{rl.num_updates}"))
    if trainer.accelerator.is_main_process:
        rename = {"step": "update", "reward": "mean_reward", "success_rate": "success_rate", "loss": "policy_loss",
                  "clip_ratio/region_mean": "clip_fraction", "kl": "approx_kl", "entropy": "entropy",
                  "grad_norm": "grad_norm", "learning_rate": "learning_rate"}
        rows = {}
        for entry in trainer.state.log_history:
            if "reward" in entry:
                rows[entry["step"]] = {new: entry.get(old, float("nan")) for old, new in rename.items()}
        (out / "metrics.csv").unlink(missing_ok=True)
        for step in sorted(rows):
            _append_metrics(out, rows[step])
        artifacts.write_manifest(out, spec)
    return out


# ------------------------------------------------------------------------------------- the subprocess
def _launch_command(cfg: Config, preset_file: Path, force: bool, init: str | os.PathLike | None) -> list[str]:
    args = ["-m", "paper_lib.ppo", "--preset", str(preset_file)]
    if force:
        args.append("--force")
    if init is not None:
        args += ["--init-checkpoint", str(init)]
    if cfg.rl.num_processes == 1 and cfg.rl.accelerate_config == "single":
        return [sys.executable, *args]
    accel = PROJECT_ROOT / "configs" / "accelerate" / f"{cfg.rl.accelerate_config}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accel),
            "--num_processes", str(cfg.rl.num_processes), *args]


def run(cfg: Config, force: bool = False, init: str | os.PathLike | None = None) -> Path:
    """Run the RL stage (rl.algo) as a subprocess, under accelerate launch when the preset asks for
    several processes, streaming its progress bar and log; skipped when a finished run matches. `init`
    replaces the full-SFT checkpoint as the start. Returns rl_dir."""
    start = init_checkpoint(cfg, init)  # fails here, with the clear message, before any launch
    out = artifacts.rl_dir(cfg)
    if cfg.rl.algo not in ("ppo", "grpo"):
        raise ValueError(f"rl.algo must be ppo or grpo, got {cfg.rl.algo!r}")
    if not force and artifacts.manifest_matches(out, run_spec(cfg, start)):
        log.info("%s is up to date (manifest matches); pass force=True to redo it", out)
        return out
    logfile = artifacts.run_dir(cfg) / "logs" / "rl.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the settings travel as a preset file named after the preset, so the child writes to the same place
        preset_file = Path(tmp) / f"{cfg.preset}.yaml"
        settings = json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "preset"}))
        preset_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        command = _launch_command(cfg, preset_file, force, init)
        log.info("running %s (log: %s)", " ".join(command), logfile)
        code, output = launch.run_streamed(command, logfile, append=False)
    if code != 0:
        raise RuntimeError(f"the RL run failed (exit code {code}); command: {' '.join(command)}\n"
                           f"last lines of its log ({logfile}):\n" + launch.tail(output, 60))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.ppo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="preset name or a .yaml path")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting, e.g. rl.num_updates=10 (repeatable)")
    parser.add_argument("--force", action="store_true", help="start over even if a finished run matches")
    parser.add_argument("--init-checkpoint", help="start from this HF checkpoint instead of the full-SFT one")
    parser.add_argument("--micro-batch-size", type=int, help="attempts per forward/backward (default 1 on GPU, 8 on CPU)")
    parser.add_argument("--envs", type=int, help="episode slots per process (default: see default_envs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the metrics
    try:
        overrides = launch.parse_overrides(args.override)
        cfg = config.load(args.preset, **overrides)
        if cfg.rl.algo == "grpo":
            out = train_grpo(cfg, force=args.force, init=args.init_checkpoint)
        elif cfg.rl.algo == "ppo":
            out = train(cfg, force=args.force, init=args.init_checkpoint, envs=args.envs,
                        micro_batch_size=args.micro_batch_size)
        else:
            raise config.ConfigError(f"rl.algo must be ppo or grpo, got {cfg.rl.algo!r}")
    except (config.ConfigError, FileNotFoundError, models.ModelUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"RL checkpoints in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
