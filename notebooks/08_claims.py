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
# # 08 · The paper's claims, answered by this run
#
# Each finding of the paper as a number with its 95% interval (or its spread over matrices), read from
# the tables of notebooks 04-07, and a verdict by the rule in its row:
# 1. OOD success peaks early in SFT, then falls;
# 2. RL recovers most of the drop, at a small cost in ID;
# 3. σ barely moves while the singular directions rotate: the share of ‖ΔW‖F² that the change of σ alone
#    accounts for (Mirsky's bound makes it at most 1; a pure rotation gives 0);
# 4. the rotation concentrates at the top and the bottom of the spectrum;
# 5. restoring the top 20% of ranks, or the first 25% of layers, recovers 70-80% of the OOD drop (read as
#    at least 70%);
# 6. imposing SFT's directions on the RL model lowers OOD success.
#
# "inconclusive" means the interval straddles the threshold, or the quantity is undefined (no drop to
# recover). The report is saved as `figures/<preset>/claims.md`.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}

# %%
import pandas as pd
from IPython.display import display

from paper_lib import claims, config, evaluate

cfg = config.load(preset, **overrides)
results = evaluate.load_results(cfg)  # 04_eval's table and named checkpoints, read and checked once
frame = claims.table(cfg, results)
with pd.option_context("display.max_colwidth", None):
    display(frame[["claim", "case", "measured", "verdict"]])

# %% [markdown]
# ## Claim 3 per module kind

# %%
display(claims.spectra_by_module(cfg, results).style.format(
    {"sigma_share": "{:.1%}", "rel_dsigma_absmax": "{:.2g}", "angle_u_mean_deg": "{:.1f}"}))
print("saved", claims.save(cfg, results))

# %% [markdown]
# ## Checks

# %%
assert set(frame["claim"]) == {1, 2, 3, 4, 5, 6}, "a stage is missing: run notebooks 01-07 first"
assert frame["verdict"].isin([claims.HOLDS, claims.FAILS, claims.UNSURE]).all()
print("all checks passed")
