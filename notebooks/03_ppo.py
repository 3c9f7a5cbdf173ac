# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · RL: PPO from the end of SFT
#
# The paper starts RL from the **full-SFT** checkpoint, whose OOD success has fallen from its early peak,
# and runs Chu et al.'s PPO (PAPER_SPEC §4) on ID hands only. The policy plays the multi-turn episodes of
# §2.5: up to 5 attempts, each graded by the verifier (§2.4: +5 correct, −1 to −3 for the kinds of wrong),
# each failure answered with `You failed this trial because …`. A value head on the policy's backbone
# scores the conversation so far; GAE (γ 0.9, λ 0.95) turns the per-attempt rewards into advantages; the
# clipped surrogate (ε 0.1) updates the whole model, with no KL term and no reference model. The paper's
# finding is that this recovers most of the OOD success SFT lost (Figure 1, notebook 04) while the weights'
# singular values barely move (05). Where the authors' code ran otherwise (a sixth, ungraded answer after
# five failures: `rl.episode_end`; the cosine stepped once per GPU: `rl.lr_steps_per_update`; Qwen's
# thought split by its last 5 tokens: `rl.thought_split`; log-probs summed in bf16: `rl.logprob_dtype`;
# the first two answer tokens left out: `rl.scored_tokens`),
# docs/faithfulness.md says so and names the option.
#
# This notebook runs the stage (`python -m paper_lib.ppo`, or `accelerate launch` on the preset's GPUs)
# and plots its per-update metrics. Checkpoints land in `runs/<preset>/rl/checkpoint-<update>`, where
# 04_eval finds them. A finished run is reused unless its settings change; `force=True` redoes it.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}  # e.g. {"rl.num_updates": 20} or {"rl.algo": "grpo"}
force = False  # redo the run even if a finished one matches

# %%
import numpy as np
from IPython.display import display

from paper_lib import artifacts, config, models, plots, ppo

cfg = config.load(preset, **overrides)
print(f"RL ({cfg.rl.algo}) starts from {ppo.init_checkpoint(cfg)}")  # no SFT checkpoint yet: run 02_sft first
out = ppo.run(cfg, force=force)
metrics = artifacts.read_table(out / ppo.METRICS, ppo.REDO_RL)
display(metrics.round(4))

# %% [markdown]
# ## Training curves
# Mean reward per attempt and the share of episodes solved within 5 attempts, the critic's loss, how often
# PPO's ratio left [1 − ε, 1 + ε], the KL from the start policy (estimated on samples the start policy
# drew at the first update) and the entropy of the sampling distribution. On `tiny` these test the
# machinery: a random 2-layer model learns the answer format, rarely the arithmetic.

# %%
fig = plots.ppo_metrics(metrics)
plots.save_figure(fig, "rl_training", cfg, notebook="03_ppo", sources=[out / ppo.METRICS], data=metrics);

# %% [markdown]
# ## Checks

# %%
found = ppo.checkpoints(cfg)
expected = {u for u in range(1, cfg.rl.num_updates + 1) if u % cfg.rl.save_every == 0} | {cfg.rl.num_updates}
assert expected <= set(found), f"missing checkpoints {sorted(expected - set(found))} in {out}"
last = metrics["update"].iloc[-1]
assert metrics["update"].is_monotonic_increasing and last == cfg.rl.num_updates, \
    f"{out / ppo.METRICS} stops at update {last} of {cfg.rl.num_updates} (cut short?): {ppo.REDO_RL}"
logged = list(plots.PPO_PANELS) if cfg.rl.algo == "ppo" else ["mean_reward", "entropy"]  # GRPO logs these two
assert np.isfinite(metrics[logged].to_numpy()).all(), "every plotted metric is finite"
model, _ = models.load(cfg, checkpoint=found[max(found)])  # a plain HF checkpoint
print("all checks passed")
