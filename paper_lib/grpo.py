"""`rl.algo: grpo`: TRL's GRPOTrainer in place of the paper's PPO, for comparison. Single-turn prompts, the
reward of the verifier on the first attempt, and the same runs/<preset>/rl/ layout as ppo.py (checkpoints,
metrics.csv, manifest), so every later stage reads either. Run it as `python -m paper_lib.ppo` with
rl.algo=grpo; the PPO stage's checkpoint choice, run spec and resume rules apply unchanged.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from . import artifacts, cards, models
from .config import Config
from .rl_run import METRICS, Grade, checkpoints, init_checkpoint, prepare_run, run_spec, validate_init, verifier


def train_grpo(cfg: Config, force: bool = False, init: str | os.PathLike | None = None,
               grade: Grade | None = None) -> Path:
    """TRL's GRPOTrainer on single-turn prompts (the reward of the first attempt), same rl_dir layout."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rl = cfg.rl
    init_path = init_checkpoint(cfg, init)
    validate_init(cfg, init_path)
    grade_name = "verifier" if grade is None else getattr(grade, "__name__", "custom")
    grade = grade or verifier(cfg.data.target, rl.partial_credit)
    out = artifacts.rl_dir(cfg)
    spec = run_spec(cfg, init_path, grade_name)
    if not prepare_run(out, spec, force, rl.num_processes):
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
    resumable = [p for p in checkpoints(cfg).values() if artifacts.trainer_state(p) is not None]
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
        (out / METRICS).unlink(missing_ok=True)  # TRL's log history holds every update
        artifacts.append_rows(out / METRICS, [rows[step] for step in sorted(rows)])
        artifacts.write_manifest(out, spec)
    return out
