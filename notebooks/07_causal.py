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
# # 07 · The causal test (Figure 7) and the orthogonal gauge (Appendix A)
#
# **Causal test.** If RL's OOD gain lives in its singular *directions*, then giving the RL model the
# SFT model's directions, while it keeps its own singular values, should remove the gain. Source = full
# SFT, target = RL, every rank of every matrix (the paper's text); `restore.causal_top_ks` adds the top-k
# restores of the authors' script, which replaces a matrix whole where k reaches its rank (PAPER_SPEC §6).
# The paper: Llama OOD 16.2% → 10.6%, Qwen 19.8% → 19.0%.
#
# **Gauge.** Why can directions move so freely? In a chain out = x W1 W2, the rotation W1 → W1 R,
# W2 → Rᵀ W2 changes neither the function nor any σ nor the weight norm. At equal parameter step, a
# rotation changes the function only at second order, while a change of σ changes it at first order.
# This follows PAPER_SPEC §7, which corrects the appendix.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}
force = False

# %%
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from paper_lib import artifacts, config, evaluate, gauge, plots, restore_eval

cfg = config.load(preset, **overrides)
table, named = evaluate.load_results(cfg)  # written by 04_eval
both = restore_eval.run_causal(cfg, table, named, force=force)  # the RL model, then each restore_eval.causal_plans
display(both[["variant", "rule", "success_rate", "ci_low", "ci_high"]].style.format(
    {"success_rate": "{:.1%}", "ci_low": "{:.1%}", "ci_high": "{:.1%}"}))

# %% [markdown]
# ## Figure 7

# %%
references = evaluate.reference_rates(table, named, ("Inter_SFT", "full SFT"))
fig = plots.causal(both, references)
plots.save_figure(fig, "fig7_causal", cfg, notebook="07_causal", data=both,
                  sources=[artifacts.eval_table(cfg), artifacts.eval_table(cfg, artifacts.CAUSAL_RESULTS)]);

# %% [markdown]
# ## Appendix A: the orthogonal gauge
# A random two-layer linear chain and a random orthogonal R. The table shows what the rotation changes
# (only the singular vectors) and how well Procrustes recovers R. The figure measures ‖Δ(W1 W2)‖F
# against the parameter step η for both kinds of step; its slopes are least-squares fits.

# %%
W1, W2 = gauge.chain(d_in=32, d_mid=16, d_out=24, seed=0)
R = gauge.random_orthogonal(W1.shape[1], torch.Generator().manual_seed(1))
invariance = gauge.gauge_invariance(W1, W2, R)
display(pd.Series(invariance, name="value").to_frame())
scaling = gauge.step_scaling(W1, W2, np.logspace(-6, -1, 11))
slopes = gauge.fitted_slopes(scaling)
fig = plots.gauge(gauge.sigma_table(W1, R), scaling, slopes, invariance["mean_vector_rotation_deg"])
plots.save_figure(fig, "figA_gauge", cfg, notebook="07_causal", slopes=slopes);

# %% [markdown]
# ## Checks

# %%
assert (both["episodes"] == cfg.data.test_size * evaluate.passes(cfg)).all(), "every row plays every test hand"
for key in ("product_change", "sigma_change_W1", "sigma_change_W2", "fro_change", "procrustes_error"):
    assert invariance[key] < 1e-10, key
assert abs(slopes["gauge"] - 2) < 0.1 and abs(slopes["sigma"] - 1) < 0.1, slopes
print("all checks passed")
