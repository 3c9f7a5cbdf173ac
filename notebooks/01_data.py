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
# # 01 · GeneralPoints: the data
#
# The 24-point card game of Chu et al. (2025) as the paper uses it (PAPER_SPEC §2). Four cards; reach 24
# with `+ - * /` and parentheses, each card used once. The **in-distribution (ID)** rule counts J, Q and K
# as 10; the **out-of-distribution (OOD)** rule counts them as 11, 12 and 13. SFT trains on ID hands only.
#
# This notebook builds, or reuses, every split under `runs/<preset>/data`. It shows the exact prompt and
# answer for each rule and how hard the hands are. Later notebooks read the splits from disk. The test
# hands are upstream's own 234 per rule where `data.test_hands` is `upstream` (qwen7b, llama11b), else
# drawn by upstream's rule from `data.test_seed`.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}  # e.g. {"data.sft_size": 2048}
force = False  # rebuild even if runs/<preset>/data matches the config

# %%
import pandas as pd
from IPython.display import display

from paper_lib import artifacts, cards, config, data, plots

cfg = config.load(preset, **overrides)
if force:
    data.build(cfg, force=True)
splits = data.load(cfg)
print(f"preset {cfg.preset}: data in {artifacts.data_dir(cfg)}")
display(data.split_sizes(splits))

# %% [markdown]
# ## The prompt and the SFT answer, for each rule
# The prompt is a single user turn, with no system prompt, character for character as upstream wrote it
# (the odd `'10'.,` included). The answer is one solver solution over the card numbers, followed by `=24`.

# %%
for split in ("id_test", "ood_test"):
    row = splits[split][0]
    print(f"===== {row['rule'].upper()} rule, cards {row['cards']} -> numbers {row['numbers']} =====")
    print(row["prompt"][0]["content"])
    print("----- SFT answer -----")
    print(row["completion"][0]["content"], "\n")

# %% [markdown]
# ## How hard are the hands?
# A raw draw is resampled until it is solvable. `solvable share` is the exact share of raw draws that
# are solvable: all 13⁴ ordered ID draws, and all 13³×3 OOD draws, which always hold a face card.
# `solutions` counts the distinct formulas (minimal parentheses) over each test hand.

# %%
tests = pd.concat([splits[s].select_columns(["rule", "cards", "n_solutions"]).to_pandas() for s in ("id_test", "ood_test")])
tests["face cards"] = tests["cards"].map(lambda cs: sum(c in "JQK" for c in cs))
stats = tests.groupby("rule").agg(
    hands=("n_solutions", "size"),
    median_solutions=("n_solutions", "median"),
    mean_solutions=("n_solutions", "mean"),
    share_one_solution=("n_solutions", lambda s: (s == 1).mean()),
    mean_face_cards=("face cards", "mean"),
)
stats["solvable share of raw draws"] = [data.solvable_share(rule) for rule in stats.index]
display(stats.round(3))

# %%
fig = plots.solutions_per_hand(tests)
plots.save_figure(fig, "data_solutions_per_hand", cfg, notebook="01_data", sources=[artifacts.data_dir(cfg)],
                  data=tests.assign(cards=tests["cards"].map(" ".join)));

# %% [markdown]
# ## Checks

# %%
assert len(splits["sft_train"]) == cfg.data.sft_size, "data.sft_size rows"
assert len(splits["id_test"]) == len(splits["ood_test"]) == cfg.data.test_size, "data.test_size hands per rule"
assert all(any(c in "JQK" for c in hand) for hand in splits["ood_test"]["cards"]), "every OOD hand holds a face card"
for split in data.SPLITS:
    for row in splits[split].select(range(min(50, len(splits[split])))):
        assert cards.grade_answer(row["completion"][0]["content"], row["numbers"]).correct, row
print("all checks passed")
