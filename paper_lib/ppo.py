"""The RL stage (PAPER_SPEC 4): PPO from the full-SFT checkpoint, by Chu et al.'s recipe (repo SFTvsRL),
written on transformers + accelerate (TRL's PPOTrainer is gone and took neither a rule-based reward nor
multi-turn episodes).

    python -m paper_lib.ppo --preset tiny                      # one process: the CPU or one GPU
    accelerate launch --config_file configs/accelerate/zero2.yaml -m paper_lib.ppo --preset qwen7b
    ppo.run(cfg)                                               # from a notebook: one of the two, streamed

The recipe, as upstream:
- an *action* is one whole attempt. Its log-probability is the sum of its tokens' log-probabilities at the
  sampling temperature; tokens before the `"formula"` key (the "thought") count thought_prob_coef times
  (rl.thought_split: qwen7b counts all but the last 5, as upstream, whose key ids were Llama-3's);
- the critic is an MLP head (h -> h/4 -> h/8 -> 1) on the policy's last hidden state at the last prompt
  token, so V is the value of the conversation so far; policy and critic share the backbone;
- rollouts are the multi-turn episodes of 2.5: every attempt gets the reward of 2.4; env slots play in
  lockstep and a slot starts a new hand when its episode ends; an episode still running at the end of an
  update carries over to the next, and its value bootstraps the return;
- GAE(gamma, lambda) over attempts, advantages normalised per process, the clipped surrogate on the
  sequence-level ratio (only the clipped term once a ratio passes 10), a clipped value loss, loss =
  policy + value_coef * value; Adam (eps) with a cosine schedule (stepped once per process per update, as
  accelerate steps upstream's); grad-norm clip.
Differences, each said where it is made: by default the last failed attempt of an episode is terminal, as
PAPER_SPEC 2.5 (rl.episode_end "upstream", qwen7b and llama11b: a sixth, ungraded "step_limit_reached"
answer at -1, and GAE runs on into the next episode); every response token counts (rl.scored_tokens
"upstream", qwen7b and llama11b: the first two drop out, and tokens of id 0, as upstream's slicing and
mask dropped them); an episode carried over an update keeps its conversation (upstream's left the ungraded answer
it generated for the bootstrap value in it, then repeated the last feedback). Gradient clipping: upstream
calls accelerator.clip_grad_norm_(0.01), which under DeepSpeed does nothing, so its clipping is whatever its
unpublished ds_zero2_offload.json set; ours clips at rl.max_grad_norm (the paper's 0.01; 0: none), with or
without DeepSpeed.
An optimizer step takes rl.samples_per_step attempts, counted across epochs, as upstream's 128 (qwen7b,
llama11b); 0 (tiny, smol) takes one step per PPO epoch over the process's whole batch. A step whose
gradient is not finite is skipped and counted in metrics.csv's nonfinite_steps (under DeepSpeed, by ZeRO's
bf16 check_grad_overflow, which skip_nonfinite_bf16_steps sets); upstream skipped a micro-batch whose log-prob was NaN
(rl/trainer/algo/ppo.py), which across processes would desynchronise them.

`rl.algo: grpo` runs TRL's GRPOTrainer instead (paper_lib/grpo.py: single turn, the verifier's reward of
the first attempt), writing the same checkpoint layout, so the two algorithms can be compared.

Outputs under runs/<preset>/rl/: checkpoint-<update>/ (an HF checkpoint + value_head.safetensors; the
latest also holds trainer_state/ for resuming), metrics.csv (one row per update), manifest.json when done.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import artifacts, launch, models
from .actor_critic import (ActorCritic, Rollouts, Step, ValueHead, gae, hidden_size, k3_kl, pad_rows, ppo_loss,
                           save_value_head, score, sequence_logp)
from .config import Config
from .rl_run import (METRICS, REDO_RL, Grade, default_envs, init_checkpoint, prepare_run, run_spec,  # noqa: F401
                     validate_init, checkpoints, verifier)  # ppo.checkpoints, ppo.METRICS...: notebook 03 reads them here

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ training
def _load_policy(cfg: Config, init: Path, acc) -> tuple[Any, Any]:
    """The policy to train and its tokenizer, on this process's device."""
    # Adam steps of lr 1e-6 vanish in bf16 weights: train in fp32 unless DeepSpeed keeps fp32 master weights
    dtype = None if acc.state.deepspeed_plugin is not None else "float32"
    policy, tokenizer = models.load(cfg, checkpoint=init, dtype=dtype, device=str(acc.device))
    policy.eval()  # no dropout: the ratio must compare one function with itself
    if cfg.rl.gradient_checkpointing:  # memory of the 7B/11B presets; the same gradients, more compute
        if getattr(policy.config, "attention_dropout", 0.0):
            raise ValueError("rl.gradient_checkpointing needs a model without dropout (HF checkpoints only in "
                             "train mode); set rl.gradient_checkpointing: false")
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.train()  # HF recomputes only in train mode; without dropout it is the same function
    if acc.device.type == "cpu" and hidden_size(policy) <= 256:
        # a tiny model gains nothing from intra-op threads and loses much when another process holds a core
        torch.set_num_threads(1)
    return policy, tokenizer


def metrics_row(t: dict[str, float], processes: int, number: int, lr: float, seconds: float,
                with_kl_ref: bool) -> dict[str, Any]:
    """One metrics.csv row from an update's sums over every process (PPOTrainer.update's `local`)."""
    nan, episodes = float("nan"), t["episodes"]
    per_episode = lambda key: t[key] / episodes if episodes else nan  # noqa: E731
    row = {
        "update": number, "mean_reward": t["reward"] / t["steps"],
        "success_rate": per_episode("successes"), "episodes": int(episodes), "attempts": int(t["steps"]),
        "episode_reward": per_episode("episode_reward"), "attempts_per_episode": per_episode("episode_attempts"),
        "policy_loss": t["policy_loss"] / t["samples"], "value_loss": t["value_loss"] / t["samples"],
        "clip_fraction": t["clipped"] / t["samples"], "approx_kl": t["drift"] / max(t["drift_tokens"], 1),
        "entropy": t["entropy"] / max(t["entropy_tokens"], 1),
        "grad_norm": t["grad_norm"] / t["normed_steps"] if t["normed_steps"] else nan,  # mean over finite steps
        "nonfinite_steps": int(t["nonfinite_steps"] / processes), "learning_rate": lr,
        "response_tokens": t["response_tokens"] / t["steps"],
        "rollout_tokens_per_s": t["response_tokens"] / max(t["rollout_seconds"] / processes, 1e-9),
        "rollout_seconds": t["rollout_seconds"] / processes, "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    if with_kl_ref:
        row["kl_ref"] = t["kl_ref"] / t["samples"]
    return row


class PPOTrainer:
    """One PPO run under accelerate: the actor-critic, Adam and its schedule, the episode slots of this
    process, and the start policy's samples that measure how far the policy has moved."""

    def __init__(self, cfg: Config, init: Path, grade: Grade, envs: int, micro: int):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        from .rollout import Generator, model_sampling

        self.cfg, self.rl, self.envs, self.micro = cfg, cfg.rl, envs, micro
        self.rounds = self.rl.steps_per_update // envs
        # attempts per optimizer step (by default one PPO epoch); gradients accumulate, and synchronise,
        # over its micro-batches. accelerate and DeepSpeed count micro-batches across epochs and updates,
        # so a step must hold whole micro-batches and an update whole steps.
        self.step_samples = self.rl.samples_per_step or self.rl.steps_per_update
        per_update = self.rl.steps_per_update * self.rl.ppo_epochs
        if self.rl.samples_per_step and (self.step_samples % micro or self.rl.steps_per_update % micro
                                         or per_update % self.step_samples):
            raise ValueError(f"rl.samples_per_step={self.step_samples} must be a multiple of the micro-batch "
                             f"({micro}, which must divide rl.steps_per_update={self.rl.steps_per_update}) and "
                             f"divide the {per_update} attempts an update trains on (steps_per_update x ppo_epochs)")
        self.optimizer_steps = per_update // self.step_samples  # ppo_epochs by default
        self.n_micro = math.ceil(self.step_samples / micro)
        self.accelerator = acc = Accelerator(cpu=launch.use_cpu(), gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.n_micro))
        plugin = acc.state.deepspeed_plugin
        if plugin is not None:  # no dataloader tells DeepSpeed the batch; its gradient_clipping 0 clips nothing
            if plugin.zero_stage == 3:  # save_checkpoint takes the weights from the main process
                raise ValueError("PPO cannot run under DeepSpeed ZeRO-3, whose processes each hold a slice of "
                                 "the weights; launch it with configs/accelerate/zero2.yaml or zero2_offload.yaml")
            plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro,
                                           gradient_accumulation_steps=self.n_micro,
                                           gradient_clipping=self.rl.max_grad_norm)
            if not skip_nonfinite_bf16_steps(plugin.deepspeed_config):
                log.warning("this DeepSpeed's bf16 config has no check_grad_overflow: a step whose gradient is "
                            "not finite would be applied (NaN weights); install a DeepSpeed that has it (0.19.8 does)")
        set_seed(self.rl.seed)  # the same value-head init on every process
        policy, self.tokenizer = _load_policy(cfg, init, acc)
        model = ActorCritic(policy, ValueHead(hidden_size(policy)).to(acc.device))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.rl.learning_rate,
                                     eps=self.rl.adam_eps, weight_decay=0.0)
        # Not prepared: update() steps it rl.lr_steps_per_update times, the authors' num_processes by default.
        self.lr_steps = acc.num_processes if self.rl.lr_steps_per_update == "processes" else 1
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
        self.rollouts = Rollouts(envs, self.rl.seed + acc.process_index, cfg.eval.max_attempts, cfg.data.target, grade,
                                 self.rl.episode_end)
        sampling = None  # rl.sampling "temperature": T alone
        if self.rl.sampling == "model":  # the start checkpoint's top_p and top_k at rl.temperature, as upstream
            sampling = {**model_sampling(self.unwrapped.policy), "temperature": self.rl.temperature}
        self.generator = Generator(self.unwrapped.policy, self.tokenizer, self.rl.max_new_tokens, self.rl.temperature,
                                   batch_size=envs, repetition_penalty=self.rl.repetition_penalty, sampling=sampling)
        self.probe: list[Step] = []  # the first update's samples, with the start policy's log-probs
        set_seed(self.rl.seed + acc.process_index)  # different hands and samples per process (upstream: seed + rank)

    def apply_scheduled_lr(self) -> None:
        """Give the optimizer that steps the schedule's rate. The schedule holds the Adam built here; under
        zero2_offload DeepSpeed steps a CPU Adam that shares its parameter groups only until a resume loads
        new ones, after which the rate would stay at the loaded value."""
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def _chunks(self, steps: list) -> list[list]:
        return [steps[i:i + self.micro] for i in range(0, len(steps), self.micro)]

    def _score(self, model, steps: list, entropy: bool = False):
        return score(model, steps, self.rl.temperature, self.tokenizer.pad_token_id, entropy)

    def _action_logp(self, token_logps: torch.Tensor, steps: list) -> torch.Tensor:
        """The steps' action log-probs; one function for old and new, so the first ratio is exactly 1."""
        weights = pad_rows([s.weights for s in steps], token_logps.shape, token_logps.device)
        return sequence_logp(token_logps, weights, self.rl.logprob_dtype)

    @torch.no_grad()
    def _rollout_pass(self, steps: list[Step]) -> tuple[float, float]:
        """Old log-probs and values of the rollout policy (the same code as the update, so the first ratio
        is 1); reference log-probs; the start policy's samples at the first update. (entropy sum, tokens)"""
        entropy = tokens = 0.0
        for chunk in self._chunks(steps):
            tok, mask, values, ent = self._score(self.unwrapped, chunk, entropy=True)
            logp = self._action_logp(tok, chunk)
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
        """V of each slot's next state, which bootstraps the return of an episode that carries over. Scored,
        not generated: upstream sampled an answer here and left it, ungraded, in the conversation."""
        boot = [Step(self.generator.render(ep.messages), [], [], 0.0, False) for ep in self.rollouts.slots]
        return torch.cat([self._score(self.unwrapped, chunk)[2].cpu() for chunk in self._chunks(boot)])

    def _optimise(self, steps: list[Step], advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """ppo_epochs passes over the batch in shuffled micro-batches; an optimizer step per pass, or per
        rl.samples_per_step attempts."""
        acc, rl, n = self.accelerator, self.rl, len(steps)
        stats = dict(policy_loss=0.0, value_loss=0.0, clipped=0.0, samples=0.0, kl_ref=0.0, grad_norm=0.0,
                     normed_steps=0.0, nonfinite_steps=0.0)
        for _ in range(rl.ppo_epochs):
            order = torch.randperm(n).tolist()
            for idx in self._chunks(order):
                chunk = [steps[j] for j in idx]
                with acc.accumulate(self.model):
                    tok, mask, values, _ = self._score(self.model, chunk)
                    dev = tok.device
                    logp = self._action_logp(tok, chunk)
                    old = lambda name: torch.tensor([getattr(s, name) for s in chunk], device=dev)
                    pl, vl, clipped = ppo_loss(logp, old("old_logp"), advantages[idx].to(dev), values,
                                               old("old_value"), returns[idx].to(dev), rl.clip_eps)
                    loss = pl + rl.value_coef * vl  # no entropy bonus: upstream passes entropy_coef, never uses it
                    if self.ref is not None:  # KL(policy || reference) per token, as GRPO estimates it
                        ref_tok = pad_rows([s.ref_logps for s in chunk], tok.shape, dev)
                        kl = k3_kl(ref_tok - tok, mask).sum(1) / mask.sum(1).clamp(min=1)
                        loss = loss + rl.kl_coef * kl
                        stats["kl_ref"] += kl.sum().item()
                    # accelerate divides by n_micro, so the step's gradient is the mean over its attempts
                    acc.backward(loss.sum() * self.n_micro / self.step_samples)
                    step = True
                    if acc.sync_gradients:
                        reported = acc.clip_grad_norm_(self.model.parameters(), rl.max_grad_norm or math.inf)  # 0: measure only
                        norm = float("nan") if reported is None else float(reported)
                        # A NaN/inf gradient would make every later weight NaN: skip the step. Every process
                        # holds the same reduced gradient, so all skip together. DeepSpeed's engine stepped
                        # inside backward, skipping such a step itself (skip_nonfinite_bf16_steps).
                        finite = math.isfinite(norm) and norm >= 0  # DeepSpeed reports a NaN/inf norm as -1
                        step = finite or acc.state.deepspeed_plugin is not None
                        stats["nonfinite_steps"] += reported is not None and not finite
                        if finite:
                            stats["grad_norm"] += norm
                            stats["normed_steps"] += 1
                    if step:
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
            total += k3_kl(tok - pad_rows([s.ref_logps for s in chunk], tok.shape, tok.device), mask).sum().item()
            tokens += mask.sum().item()
        return total, tokens

    def update(self, number: int) -> dict:
        """Collect steps_per_update attempts, take the optimizer steps of ppo_epochs passes; the metrics of
        all processes."""
        rl, t0 = self.rl, time.time()
        table, finished = self.rollouts.collect(self.generator, self.rounds, rl.thought_prob_coef, rl.thought_split,
                                                rl.scored_tokens)
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
        for _ in range(self.lr_steps):
            self.scheduler.step()
        self.apply_scheduled_lr()
        drift, drift_tokens = self._drift()

        # sums over processes, then ratios
        local = {
            "reward": rewards.sum().item(), "steps": len(steps), "episodes": len(finished),
            "successes": sum(e.success for e in finished), "episode_reward": sum(sum(e.rewards) for e in finished),
            "episode_attempts": sum(len(e.attempts) for e in finished), "policy_loss": stats["policy_loss"],
            "value_loss": stats["value_loss"], "clipped": stats["clipped"], "samples": stats["samples"],
            "kl_ref": stats["kl_ref"], "entropy": entropy, "entropy_tokens": tokens, "drift": drift,
            "drift_tokens": drift_tokens, "grad_norm": stats["grad_norm"], "normed_steps": stats["normed_steps"],
            "nonfinite_steps": stats["nonfinite_steps"],
            "response_tokens": sum(len(s.response_ids) for s in steps), "rollout_seconds": rollout_seconds,
        }
        reduced = self.accelerator.reduce(torch.tensor(list(local.values()), dtype=torch.float64,
                                                       device=self.accelerator.device), "sum").tolist()
        return metrics_row(dict(zip(local, reduced)), self.accelerator.num_processes, number, lr,
                           time.time() - t0, self.ref is not None)


def skip_nonfinite_bf16_steps(deepspeed_config: dict) -> bool:
    """Have DeepSpeed's ZeRO optimizer skip a bf16 step whose gradient is not finite, as the single-process
    path skips it (bf16.check_grad_overflow: on by default in 0.19.8, off or absent in older versions, which
    apply the step). False where the installed DeepSpeed has no such setting."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    if "check_grad_overflow" not in getattr(DeepSpeedBF16Config, "model_fields", {}):
        return False
    deepspeed_config.setdefault("bf16", {"enabled": False})["check_grad_overflow"] = True
    return True


# ---------------------------------------------------------------------------------- a run's checkpoints
def save_checkpoint(trainer: PPOTrainer, out: Path, number: int) -> None:
    """Write checkpoint-<number> under a temporary name and rename it when complete, so a kill leaves the
    last complete checkpoint. Only the newest keeps trainer_state/ (optimizer shards are large)."""
    acc = trainer.accelerator
    tmp = out / f".checkpoint-{number}.partial"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "trainer_state"))  # weights, optimizer, schedule, every process's RNG
    with open(tmp / "trainer_state" / f"rollouts_{acc.process_index}.pkl", "wb") as fh:
        pickle.dump({"rollouts": trainer.rollouts.state_dict(), "probe": trainer.probe}, fh)
    if acc.is_main_process:
        trainer.unwrapped.policy.save_pretrained(tmp, safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp)
        save_value_head(trainer.unwrapped.value_head, tmp / "value_head.safetensors")
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = out / f"checkpoint-{number}"
        artifacts.replace_dir(tmp, final)
        for other, path in artifacts.numbered_checkpoints(out).items():
            if other != number:
                shutil.rmtree(path / "trainer_state", ignore_errors=True)
        log.info("saved %s", final)
    acc.wait_for_everyone()


def resume(trainer: PPOTrainer, out: Path) -> int:
    """Load the newest checkpoint's trainer state into `trainer`, if any; the last finished update (0 if
    none)."""
    found = {u: p for u, p in artifacts.numbered_checkpoints(out).items() if (p / "trainer_state").is_dir()}
    if not found:
        return 0
    update = max(found)
    state = found[update] / "trainer_state"
    acc = trainer.accelerator
    if not (state / f"rollouts_{acc.process_index}.pkl").is_file() or (state / f"rollouts_{acc.num_processes}.pkl").is_file():
        raise ValueError(f"{found[update]} was written by another number of processes; resume with the same "
                         f"number, or pass force=True to start over")
    acc.load_state(str(state))  # weights, optimizer, schedule, every process's RNG
    trainer.apply_scheduled_lr()
    with open(state / f"rollouts_{acc.process_index}.pkl", "rb") as fh:
        saved = pickle.load(fh)
    trainer.rollouts.load_state_dict(saved["rollouts"])
    trainer.probe = saved["probe"]
    log.info("resuming from %s (update %d of %d)", found[update], update, trainer.rl.num_updates)
    return update


def train(cfg: Config, force: bool = False, init: str | os.PathLike | None = None, grade: Grade | None = None,
          micro_batch_size: int | None = None, progress: bool = True) -> Path:
    """Run PPO for cfg, resuming from the last checkpoint of an interrupted run and skipping a finished one
    (force: start over); returns rl_dir. `grade(hand, text) -> Verdict` replaces the verifier (tests use an
    easy reward); micro_batch_size: attempts per forward/backward (default rl.micro_batch_size)."""
    from tqdm.auto import tqdm

    rl = cfg.rl
    if rl.temperature <= 0:
        raise ValueError("rl.temperature must be > 0: PPO's log-probabilities are those of the sampling distribution")
    init_path = init_checkpoint(cfg, init)
    validate_init(cfg, init_path)
    spec = run_spec(cfg, init_path, "verifier" if grade is None else getattr(grade, "__name__", "custom"))
    envs = rl.env_slots or default_envs(cfg)
    if rl.steps_per_update % envs:
        raise ValueError(f"rl.env_slots={envs} must divide rl.steps_per_update={rl.steps_per_update}")
    # Upstream backpropagates one attempt at a time (memory on big models); on CPU a few at once is faster.
    micro = micro_batch_size or rl.micro_batch_size or (1 if torch.cuda.is_available() else 8)
    out = artifacts.rl_dir(cfg)
    main = launch.process_state().is_main_process
    if not main:  # one process reports
        for name in ("paper_lib", __name__):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not prepare_run(out, spec, force, rl.num_processes):
        return out

    threads = torch.get_num_threads()  # the trainer may lower it for a tiny model; restored for the caller
    try:
        trainer = PPOTrainer(cfg, init_path, grade or verifier(cfg.data.target, rl.partial_credit), envs, micro)
        start = resume(trainer, out)
        if main:
            artifacts.keep_rows(out / METRICS, "update", start)  # rows a killed run logged after its last checkpoint are redone
        log.info("PPO on %d process(es): %d slots x %d rounds = %d attempts per process per update, micro-batch "
                 "%d, %d optimizer step(s) of %d attempts per update, %d updates from %s",
                 trainer.accelerator.num_processes, envs, trainer.rounds, rl.steps_per_update, micro,
                 trainer.optimizer_steps, trainer.step_samples, rl.num_updates, init_path)
        launch.report_processes("ppo", trainer.accelerator, f"{rl.steps_per_update} attempts per update "
                                f"(of {rl.steps_per_update * trainer.accelerator.num_processes} in all)")
        bar = tqdm(total=rl.num_updates, initial=start, desc="PPO updates", disable=not (main and progress))
        for number in range(start + 1, rl.num_updates + 1):
            row = trainer.update(number)
            if main:
                artifacts.append_rows(out / METRICS, [row])
            bar.set_postfix(reward=f"{row['mean_reward']:.2f}", success=f"{row['success_rate']:.2f}")
            bar.update()
            log.info("update %d: %s", number, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "update"))
            if number % rl.save_every == 0 or number == rl.num_updates:
                save_checkpoint(trainer, out, number)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    if main:
        artifacts.write_manifest(out, spec)
    trainer.accelerator.wait_for_everyone()
    return out


# ------------------------------------------------------------------------------------- the subprocess
def launch_command(cfg: Config, force: bool = False, init: str | os.PathLike | None = None) -> list[str]:
    """The command that runs the RL stage (launch.stage_command): `python -m paper_lib.ppo --preset P
    --override k=v ...`, behind accelerate launch with configs/accelerate/<rl.accelerate_config>.yaml."""
    return launch.stage_command(cfg, "ppo", "rl", _flags(force, init))


def _flags(force: bool, init: str | os.PathLike | None) -> list[str]:
    return (["--force"] if force else []) + (["--init-checkpoint", str(init)] if init is not None else [])


def run(cfg: Config, force: bool = False, init: str | os.PathLike | None = None, stream: bool = True) -> Path:
    """Run the RL stage (rl.algo) in a subprocess (launch.run_stage) unless a finished run matches; its
    output is appended to runs/<preset>/logs/ppo.log, kept in rl_dir/run.log and echoed. `init` replaces
    the full-SFT checkpoint as the start. Returns rl_dir."""
    start = init_checkpoint(cfg, init)  # fails here, with the clear message, before any launch
    validate_init(cfg, start)
    out = artifacts.rl_dir(cfg)
    spec = run_spec(cfg, start)
    if artifacts.finished_run(out, spec, REDO_RL, force):
        return out
    launch.run_stage(cfg, "ppo", "rl", _flags(force, init), stream=stream, keep_log_in=out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = launch.stage_arguments("python -m paper_lib.ppo", __doc__.split("\n\n")[0], "start")
    parser.add_argument("--init-checkpoint", help="start from this HF checkpoint instead of the full-SFT one")
    parser.add_argument("--micro-batch-size", type=int, help="attempts per forward/backward (default rl.micro_batch_size, or 1 on GPU, 8 on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the metrics

    def work() -> str:
        cfg = launch.stage_config(args)
        if cfg.rl.algo == "grpo":  # else "ppo": config.load admits only the two
            from .grpo import train_grpo  # TRL's trainer, imported only when asked for

            return f"RL checkpoints in {train_grpo(cfg, force=args.force, init=args.init_checkpoint)}"
        out = train(cfg, force=args.force, init=args.init_checkpoint, micro_batch_size=args.micro_batch_size)
        return f"RL checkpoints in {out}"

    return launch.run_main(work)


if __name__ == "__main__":
    sys.exit(main())
