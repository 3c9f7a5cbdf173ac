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
# # 05 · Spectra of the weights (Figures 3 and 4)
#
# For every weight matrix W = U Σ Vᵀ, compare the checkpoints (PAPER_SPEC §5):
# - the singular values σ before and after, and Δσ;
# - the energy ‖W‖F² = Σσ²;
# - the principal angles between the top-k singular subspaces. These are computed from sines where
#   they are small, so tiny angles stay accurate.
#
# The paper's finding: σ barely moves (|Δσ| ≲ 0.005, centred on zero), while the singular *directions*
# rotate. Angles start near 25–30° for the leading directions and rise toward 90° in the tail, with the
# SFT and RL curves nearly on top of each other. Principal angles come sorted, though, so their rise is
# there by construction and says nothing about *which* directions turned: Figure 4's second row plots
# each singular vector's own turn against its index (claim 4's measure), where that can be read.
#
# As in the paper's captions, each stage is measured from the checkpoint it started at: SFT as base → full
# SFT, RL as full SFT → RL. The authors' own plots and angle script (analysis/raw_metrics_angle.py)
# measured SFT from Inter_SFT instead: `spectra.sft_before = "inter_sft"` shows that pair. Base → RL (the
# two stages together), base → Inter_SFT and the other SFT pair are extra tables, clearly labelled, not
# Figure 3. Tensors stream from the shards one at a time; the decompositions are cached for 06_restore.

# %% tags=["parameters"]
preset = "tiny"
overrides = {}
force = False
# Figure 3: "whole", every singular value on a log σ axis; "authors", the top spectra.k on a linear axis, as
# the authors' plots (analysis/singular_value_*.pdf) and the paper's "0 to 0.005" reading of them
fig3_view = "whole"
# Figure 4's layer-0 matrix: the text's up_proj; the authors' own angle plots (analysis/delta_stats/
# subspace_angles_step-*.png) drew q_proj, k_proj, v_proj and down_proj
fig4_module = "up_proj"

# %%
from IPython.display import display

from paper_lib import artifacts, config, evaluate, plots, spectra

cfg = config.load(preset, **overrides)
table, named = evaluate.load_results(cfg)  # written by 04_eval
figure = spectra.paper_pairs(cfg.spectra.sft_before, named)  # Figures 3 and 4: (stage, before, after)
paper_pairs = [(before, after) for _, before, after in figure]
pairs = spectra.analysed_pairs(named)  # the figures' pairs and the extras, each computed once
by_label = evaluate.checkpoints_by_label(cfg)
checkpoints = {label: by_label[label].path for pair in pairs for label in pair}
print("Figures 3-4:", ", ".join(f"{a} → {b}" for a, b in paper_pairs),
      "| extra:", ", ".join(f"{a} → {b}" for a, b in pairs if (a, b) not in paper_pairs))
spec_table = spectra.run_stage(cfg, checkpoints, pairs, force=force)
out = artifacts.spectra_dir(cfg)

# %% [markdown]
# ## Figure 3: singular values barely move

# %%
shown = {f"{stage}: {before} → {after}": spectra.load_pair(out, before, after) for stage, before, after in figure}
fig = plots.singular_values(shown, view=fig3_view, top=cfg.spectra.k)
plots.save_figure(fig, "fig3_singular_values", cfg, notebook="05_spectra", sources=[out]);

# %% [markdown]
# ## Figure 4: the principal-angle spectrum, layer-0 up_proj (`fig4_module`)
# Top row, the paper's figure: the sorted principal angles. Bottom row: the angle between each singular
# vector before and after, by its index.

# %%
fig = plots.principal_angle_spectrum(shown, module=fig4_module)
plots.save_figure(fig, "fig4_principal_angles", cfg, notebook="05_spectra", sources=[out]);

# %% [markdown]
# ## Every pair, Figure 3's and the extras
# Per module kind, the largest |Δσ| relative to σ₁ and the mean principal angle, for each pair. Base → RL
# adds SFT's change to RL's, so it is not what the paper's Figure 3 shows for RL. Inter_SFT → full SFT is
# what the authors' angle script compared (their checkpoint-140 against 1100).

# %%
summary = (spec_table.groupby(["pair", "module"])
           .agg(dsigma_absmax=("dsigma_absmax", "max"), angle_u_mean_deg=("angle_u_mean_deg", "mean"))
           .unstack("pair"))
display(summary.style.format("{:.3g}"))

# %% [markdown]
# ## Every layer and module
# Mean principal angle and the largest |Δσ| relative to σ₁, per layer × module, for Figure 3's SFT pair.
# A blank angle is a module whose top-k left subspace is the whole space (k ≥ its rows, e.g. k/v_proj
# at full rank): every angle is 0 there by construction, so the tables say NaN rather than "no rotation".
# Short of that, the first 2k − rows angles are 0 by force (`angle_u_trivial`) and each mean leaves them out.

# %%
(_, sft_from, sft_to), *_ = figure
fig = plots.layer_module_heatmap(spec_table[spec_table["pair"] == f"{sft_from}__{sft_to}"], f"{sft_from} → {sft_to}")
plots.save_figure(fig, "spectra_heatmap", cfg, notebook="05_spectra", sources=[out], data=spec_table);  # every pair

# %% [markdown]
# ## Energy and size of the change
# Energy ‖W‖F² summed per module kind, before and after, with ‖ΔW‖F / ‖W‖F. A rotation keeps the
# energy, and so does a weight decay that sees only σ.

# %%
energy = (spec_table.groupby(["pair", "module"])
          .agg(energy_before=("energy_before", "sum"), energy_after=("energy_after", "sum"),
               rel_fro_delta=("rel_fro_delta", "mean"), dsigma_absmax=("dsigma_absmax", "max"),
               angle_u_mean_deg=("angle_u_mean_deg", "mean"))
          .assign(energy_change=lambda t: t["energy_after"] / t["energy_before"] - 1))
display(energy.style.format({"energy_before": "{:.4g}", "energy_after": "{:.4g}", "rel_fro_delta": "{:.2e}",
                             "dsigma_absmax": "{:.2e}", "angle_u_mean_deg": "{:.1f}", "energy_change": "{:+.2e}"}))

# %% [markdown]
# ## embed_tokens and lm_head
# Where the two are untied: the principal angles between their hidden-space singular subspaces, and
# the cosine between a token's embedding row and its output row (the paper's alignment hypothesis).

# %%
alignment = out / spectra.ALIGNMENT_TABLE
if alignment.is_file():
    display(artifacts.read_table(alignment, "rerun this notebook with force = True"))
else:
    print("embed_tokens and lm_head are tied in this model: nothing to compare")

# %% [markdown]
# ## Checks

# %%
assert set(spec_table["pair"]) == {f"{a}__{b}" for a, b in pairs}
assert spec_table["angle_u_mean_deg"].dropna().between(0, 90).all()
assert (spec_table["angle_u_mean_deg"].isna() == (spec_table["k"] >= spec_table["rows"])).all(), \
    "an angle is undefined exactly where the top k span the whole space"
print("all checks passed")
