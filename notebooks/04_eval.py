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
# # 04 · Success across checkpoints (Figure 1)
#
# Every checkpoint plays the ID and OOD test hands (`data.test_size` per rule: 234 in the paper, 32 on
# tiny) by the multi-turn protocol (PAPER_SPEC §2.5): up to 5 graded attempts, each failure answered
# with `You failed this trial because …`. A hand counts as a success when an attempt is correct. The
# checkpoints are the base model, the SFT checkpoints `eval.sft_every` picks (every one where it is 0)
# and every RL checkpoint that exists.
#
# The paper's finding: ID success rises steadily through SFT, while OOD success peaks early at
# **Inter_SFT** and then falls. RL, started from the end of SFT, recovers most of the lost OOD success.
# Results are cached per checkpoint under `runs/<preset>/eval/`, so re-running after new checkpoints
# appear evaluates only those. With `eval.num_processes` above 1 (qwen7b, llama11b: 4 GPUs) those are dealt
# out to that many processes of their own, a whole model on each GPU; their log streams below.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}
force = False  # re-evaluate every checkpoint

# %%
from IPython.display import display

from paper_lib import artifacts, config, evaluate, plots, recovery

cfg = config.load(preset, **overrides)
checkpoints = evaluate.discover_checkpoints(cfg)
print(f"{len(checkpoints)} checkpoint(s):", ", ".join(c.label for c in checkpoints))
table = evaluate.sweep(cfg, force=force, checkpoints=checkpoints)
display(table.pivot(index="label", columns="rule", values="success_rate").reindex([c.label for c in checkpoints]).style.format("{:.1%}"))

# %% [markdown]
# ## Figure 1

# %%
has_sft = (table["stage"] == "sft").any()
named = evaluate.named_checkpoints(cfg, table) if has_sft else None
fig = plots.success_across_checkpoints(table, named=named)
plots.save_figure(fig, "fig1_success", cfg, notebook="04_eval", sources=[artifacts.eval_table(cfg)],
                  data=table);

# %% [markdown]
# ## The paper's quantities
# The drop is Inter_SFT minus full SFT; the relative drop divides it by Inter_SFT (the paper: 48% for
# Llama, 13% for Qwen); RL's share recovered is (RL − full SFT) / drop. The 95% intervals come from a
# paired bootstrap over the test hands. Inter_SFT is the best of `inter_candidates` SFT checkpoints on
# these very OOD hands, so the OOD drop's intervals are a band over all of them: picking the best of
# several equal checkpoints does not make a drop. How the checkpoints are chosen:

# %%
print(evaluate.INTER_SFT_RULE)
if named:
    print(f"here: Inter_SFT = {named.inter_sft}, full SFT = {named.full_sft}, RL = {named.rl}")
    quantities = recovery.headline(cfg, named)
    display(quantities)
else:
    print("no SFT checkpoint yet: run 02_sft first")

# %% [markdown]
# ## A few failed episodes
# Transcripts of OOD hands that the last checkpoint failed, with each attempt and the verifier's verdict.

# %%
last = checkpoints[-1].label
eps = evaluate.episodes_table(artifacts.eval_dir(cfg) / last)
for _, ep in eps[(eps["rule"] == "ood") & ~eps["success"]].head(3).iterrows():
    print(f"=== {last}, OOD hand {ep['cards']} -> {ep['numbers']}")
    for k, attempt in enumerate(ep["transcript"], 1):
        print(f"  attempt {k}: {attempt['status']:<16} reward {attempt['reward']:+.0f}  formula {attempt['formula'][:60]!r}")
        print(f"             {attempt['message'][:120]}")

# %% [markdown]
# ## Checks

# %%
assert set(table["label"]) == {c.label for c in checkpoints}, "one row per checkpoint found"
assert (table["episodes"] == cfg.data.test_size * evaluate.passes(cfg)).all(), "every checkpoint played every test hand"
if named:
    step = dict(zip(table["label"], table["step"]))
    assert step[named.inter_sft] <= step[named.full_sft], "Inter_SFT is chosen up to full SFT"
assert table["success_rate"].between(table["ci_low"], table["ci_high"]).all(), "each rate lies in its interval"
print("all checks passed")
