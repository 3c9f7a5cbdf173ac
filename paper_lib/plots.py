"""Figures: one function per paper figure (added by the stage that makes it) and one `save_figure`.

Plotting reads tables only, so a figure can be restyled without recomputing anything. Every saved
figure gets a png, a pdf and a JSON sidecar saying what made it; one drawn with other settings before is
kept under earlier/<its config hash>/.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import artifacts
from .config import Config

log = logging.getLogger(__name__)
RULE_COLORS = {"id": "#1f77b4", "ood": "#d62728"}
FIGURE_FILES = (".png", ".pdf", ".json", ".csv")  # what save_figure writes for one figure
EARLIER = "earlier"  # figures/<preset>/earlier/<config hash>/: figures of other settings, never overwritten


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig: plt.Figure, name: str, cfg: Config, notebook: str,
                sources: list[str] | None = None, data: pd.DataFrame | None = None, **extra: Any) -> Path:
    """Write figures/<preset>/<name>.png, .pdf and .json (notebook, preset, config hash, code version,
    the tables it was drawn from) and, given `data`, the tidy table the figure shows as <name>.csv, small
    enough to commit beside it; returns the png path."""
    out = artifacts.figures_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    config_hash = cfg.section_hash()
    keep_earlier_figure(out, name, config_hash)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    if data is not None:
        with artifacts.atomic_file(out / f"{name}.csv") as tmp:
            data.to_csv(tmp, index=False)
        extra = {"data": f"{name}.csv", **extra}
    sidecar = {
        "figure": name,
        "notebook": notebook,
        "preset": cfg.preset,
        "config_hash": config_hash,  # keep_earlier_figure tells settings apart by it
        "code_version": artifacts.git_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": [str(s) for s in sources or []],
        **extra,
    }
    (out / f"{name}.json").write_text(json.dumps(sidecar, indent=2, default=str))
    return png


def keep_earlier_figure(out: Path, name: str, config_hash: str) -> Path | None:
    """Move figure `name` (its png, pdf, sidecar and csv) to out/earlier/<its config hash>/ when its sidecar
    names other settings than `config_hash`, so that re-running a notebook with a changed parameter keeps
    the figure the earlier settings drew; returns where it went. A figure of the same settings is redrawn
    in place (as is a copy of those settings already kept, which the move replaces)."""
    present = [out / f"{name}{ext}" for ext in FIGURE_FILES if (out / f"{name}{ext}").exists()]
    if not present:
        return None
    try:
        earlier = str(json.loads((out / f"{name}.json").read_text())["config_hash"])
    except (OSError, ValueError, KeyError, TypeError):
        earlier = ""
    if earlier == config_hash:
        return None
    if not earlier.isalnum():  # no sidecar, or not one of ours: named by the figure's file time instead
        earlier = time.strftime("%Y%m%d-%H%M%S", time.localtime(present[0].stat().st_mtime))
    kept = out / EARLIER / earlier
    kept.mkdir(parents=True, exist_ok=True)
    for path in present:
        os.replace(path, kept / path.name)
    log.warning("%s was drawn with other settings (config %s): kept in %s", out / name, earlier, kept)
    return kept


def solutions_per_hand(table: pd.DataFrame) -> plt.Figure:
    """Data figure (01_data): how many distinct solutions the test hands have, per rule.

    `table` has one row per hand with columns rule and n_solutions.
    """
    style()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    # every solvable hand has at least one solution, so log bins are safe
    sns.histplot(data=table, x="n_solutions", hue="rule", log_scale=2, bins=12, multiple="dodge", shrink=0.8,
                 palette=RULE_COLORS, ax=ax)
    ax.set_xlabel("distinct solutions of the hand (log scale)")
    ax.set_ylabel("hands")
    ax.set_title("Test hands: how many ways reach 24")
    fig.tight_layout()
    return fig


STAGE_ORDER = {"base": 0, "sft": 1, "rl": 2, "other": 3}
STAGE_BARS = (("Inter_SFT", "inter_sft"), ("full SFT", "full_sft"), ("RL", "rl"))  # the authors' three stages
MAX_TICK_LABELS = 30  # past this many checkpoints, Figure 1 labels every n-th so the labels stay legible


def _interval(rows: pd.DataFrame) -> list:
    """errorbar's yerr, in percent, from a table's success_rate, ci_low and ci_high."""
    return [100 * (rows["success_rate"] - rows["ci_low"]), 100 * (rows["ci_high"] - rows["success_rate"])]


def success_across_checkpoints(table: pd.DataFrame, named: Any = None) -> plt.Figure:
    """Figure 1: ID and OOD success rate (Wilson 95% intervals).

    Left, every checkpoint, base -> SFT -> RL (PAPER_SPEC 9). RL's line starts at the full-SFT checkpoint
    it was trained from (dashed to its first point), not at the last SFT step, which may lie further on.
    Right, given `named` (evaluate.Named), the three stages of the authors' own Figure 1
    (RL_Heals_SFT analysis/task1_grouped.png: "Premax", "Moderate", "RL"): Inter_SFT, full SFT and the
    last RL checkpoint, side by side per test set.

    `table` is evaluate.sweep's: label, stage, step, rule, success_rate, ci_low, ci_high.
    """
    style()
    order = (table.drop_duplicates("label").assign(key=lambda t: t["stage"].map(STAGE_ORDER))
             .sort_values(["key", "step"])["label"].tolist())
    x = {label: i for i, label in enumerate(order)}
    stage = table.drop_duplicates("label").set_index("label")["stage"]
    width = min(16.0, max(6.5, 0.45 * len(order) + 2))
    if named is None:
        fig, ax = plt.subplots(figsize=(width, 3.8))
    else:
        fig, (ax, bars) = plt.subplots(1, 2, figsize=(width + 4.0, 3.8), width_ratios=[width, 4.0])
    full = getattr(named, "full_sft", None)
    for rule, group in table.groupby("rule"):
        group = group.assign(x=group["label"].map(x)).sort_values("x")
        color = RULE_COLORS.get(rule)
        before_rl = group[group["label"].map(stage) != "rl"]
        ax.errorbar(before_rl["x"], 100 * before_rl["success_rate"], yerr=_interval(before_rl), marker="o",
                    capsize=3, color=color, label=rule.upper())
        rl = group[group["label"].map(stage) == "rl"]
        if len(rl):
            ax.errorbar(rl["x"], 100 * rl["success_rate"], yerr=_interval(rl), marker="s", capsize=3, color=color)
            start = group[group["label"] == full]
            if len(start):  # RL continues from full SFT, wherever SFT went on after it
                ax.plot([start["x"].iloc[0], rl["x"].iloc[0]],
                        [100 * start["success_rate"].iloc[0], 100 * rl["success_rate"].iloc[0]],
                        color=color, ls="--", lw=1, alpha=0.6)
    for name, shade in (("sft", "#f2f2f2"), ("rl", "#e6f0e6")):
        xs = [x[l] for l in order if stage[l] == name]
        if xs:
            ax.axvspan(min(xs) - 0.5, max(xs) + 0.5, color=shade, zorder=0)
            ax.text((min(xs) + max(xs)) / 2, 1.0, name.upper(), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9, color="0.35")
    for label, text in ((getattr(named, "inter_sft", None), " Inter_SFT"), (full, " full SFT (RL's start)")):
        if label in x:
            ax.axvline(x[label], color="0.4", ls="--", lw=1)
            ax.text(x[label], 0.02, text, transform=ax.get_xaxis_transform(), fontsize=8, color="0.3", rotation=90,
                    va="bottom")
    every = -(-len(order) // MAX_TICK_LABELS)
    shown = {l for i, l in enumerate(order) if i % every == 0} | {getattr(named, n, None) for _, n in STAGE_BARS}
    ax.set_xticks(range(len(order)), [l if l in shown else "" for l in order], rotation=45, ha="right")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(bottom=0)
    if named is None:
        ax.legend(title="test set", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.legend(title="test set", loc="upper left", fontsize=8)
        _stage_bars(bars, table, named)
    fig.tight_layout()
    return fig


def _stage_bars(ax: plt.Axes, table: pd.DataFrame, named: Any) -> None:
    """Figure 1's right panel: Inter_SFT, full SFT and RL per test set, as the authors drew it."""
    stages = [(name, getattr(named, attr)) for name, attr in STAGE_BARS if getattr(named, attr, None)]
    width = 0.8 / len(stages)
    for k, (name, label) in enumerate(stages):
        rows = table[table["label"] == label].set_index("rule").reindex(["id", "ood"])
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(2)]
        ax.bar(xs, 100 * rows["success_rate"], width, yerr=_interval(rows), capsize=3, label=f"{name} ({label})",
               color=sns.color_palette("Greys", len(stages) + 1)[k + 1], edgecolor="black", lw=0.6)
        for xi, rate in zip(xs, rows["success_rate"]):
            ax.text(xi, 100 * rate, f"{100 * rate:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([0, 1], ["ID", "OOD"])
    ax.set_ylim(bottom=0)
    ax.set_title("the three stages", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")

REFERENCE_STYLES = {"base": ("0.2", ":"), "Inter_SFT": ("#2ca02c", "--"), "full SFT": ("#9467bd", "-.")}


def restore_success(table: pd.DataFrame, references: pd.DataFrame, xlabel: str, title: str,
                    numeric: bool = False) -> plt.Figure:
    """Figures 5 and 6: ID and OOD success after restoring directions, the variants side by side (one line
    per `variant`, points at column `x` in table order), with the base, Inter_SFT and full-SFT rates as
    horizontal lines. The claim's point (`claim_point`) is ringed.

    `references` has columns name (base / Inter_SFT / full SFT), rule, success_rate. numeric=True places
    `x` (numbers, e.g. Figure 6's top k) on a log2 axis, so 512 -> 717 is not drawn as wide as 1024 -> 2048.
    """
    style()
    order = list(dict.fromkeys(table["x"]))
    position = ([float(v) for v in order] if numeric else list(range(len(order))))
    names = list(dict.fromkeys(table["variant"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.5, 1.0 * len(order) + 5), 3.8), sharey=False)
    palette = sns.color_palette("deep", len(names))
    for ax, rule in zip(axes, ("id", "ood")):
        for k, (name, color) in enumerate(zip(names, palette)):
            part = table[(table["rule"] == rule) & (table["variant"] == name)].set_index("x").reindex(order)
            dodge = (k - (len(names) - 1) / 2) * 0.08  # the intervals side by side
            xs = [p * 2 ** (dodge / 2) if numeric else p + dodge for p in position]
            ax.errorbar(xs, 100 * part["success_rate"], yerr=_interval(part), marker="o", ms=4, capsize=2,
                        color=color, label=name)
            if "claim_point" in part:
                ring = part["claim_point"].fillna(False).astype(bool).to_numpy()
                ax.scatter([x for x, r in zip(xs, ring) if r], 100 * part["success_rate"][ring], s=110,
                           facecolors="none", edgecolors="black", linewidths=1.0, zorder=5)
        for _, ref in references[references["rule"] == rule].iterrows():
            color, ls = REFERENCE_STYLES.get(ref["name"], ("0.5", "--"))
            ax.axhline(100 * ref["success_rate"], color=color, ls=ls, lw=1.2, label=ref["name"])
        if numeric:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(position, order, rotation=30, ha="right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("success rate (%)")
        ax.set_title(f"{rule.upper()} test set")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="source.keep  (○ claim)",
                   title_fontsize=8)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig


def causal(table: pd.DataFrame, references: pd.DataFrame | None = None) -> plt.Figure:
    """Figure 7: the RL model against the RL model with the SFT model's singular directions, ID and OOD
    success with Wilson 95% intervals. `table` has columns variant, rule, success_rate, ci_low, ci_high;
    `references` (name, rule, success_rate; e.g. full SFT, Inter_SFT) are short lines over each test set's
    bars, the levels the paper's "a loss of over a third of its generalization advantage" is measured by."""
    style()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    variants = list(dict.fromkeys(table["variant"]))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        part = table[table["variant"] == variant].set_index("rule").loc[["id", "ood"]]
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(2)]
        ax.bar(xs, 100 * part["success_rate"], width, label=variant, yerr=_interval(part), capsize=4)
    for _, ref in (references if references is not None else pd.DataFrame()).iterrows():
        color, ls = REFERENCE_STYLES.get(ref["name"], ("0.5", "--"))
        i = ("id", "ood").index(ref["rule"])
        ax.hlines(100 * ref["success_rate"], i - 0.45, i + 0.45, colors=color, linestyles=ls, lw=1.2,
                  label=ref["name"] if ref["rule"] == "id" else None)
    ax.set_xticks([0, 1], ["ID", "OOD"])
    ax.set_ylabel("success rate (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Imposing SFT's directions on the RL model")
    fig.tight_layout()
    return fig


def gauge(sigmas: pd.DataFrame, scaling: pd.DataFrame, slopes: dict[str, float], rotation_deg: float) -> plt.Figure:
    """Appendix A: (left) W1's singular values before and after a gauge rotation, identical, while its
    singular vectors rotate by `rotation_deg` on average; (right) ‖Δ(W1 W2)‖F against the parameter step η on log-log axes, a gauge step
    (fitted slope ≈ 2) against a change of σ (slope ≈ 1)."""
    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for column, marker in (("before", "o"), ("after", "x")):
        left.plot(sigmas["index"], sigmas[column], marker=marker, ls="none", label=f"σ {column} rotation")
    left.set_xlabel("index i")
    left.set_ylabel("σᵢ(W1)")
    left.set_title(f"σ unchanged; vectors rotate {rotation_deg:.0f}° on average",
                   fontsize=10)
    left.legend(fontsize=8)
    for kind, group in scaling.groupby("kind"):
        right.loglog(group["eta"], group["product_change"], marker="o",
                     label=f"{kind} step (fitted slope {slopes[kind]:.2f})")
    right.set_xlabel("parameter step η")
    right.set_ylabel("‖Δ(W1 W2)‖F")
    right.set_title("Same step size, different cost to the function", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _layer0(table: pd.DataFrame, modules: tuple[str, ...]) -> dict[str, str]:
    rows = table[(table["layer"] == 0) & table["module"].isin(modules) & (table["block"] != "cross_attn")]
    return {r["module"]: r["name"] for _, r in rows.iterrows()}


FIG3_VIEWS = ("whole", "authors")


def singular_values(pairs: dict[str, tuple[pd.DataFrame, dict]], modules=("q_proj", "k_proj", "v_proj"),
                    view: str = "whole", top: int | None = None) -> plt.Figure:
    """Figure 3: σ before and after (left axis) and Δσ = σ_after − σ_before (right axis) of layer 0's
    q/k/v, one row per pair (e.g. base→SFT, full SFT→RL). `pairs` maps a title to spectra.load_pair's output.

    Every panel's Δσ axis has the same symmetric limits, as in the authors' plots (±0.02 on every SFT and
    RL panel), so a small Δσ looks small beside a large one. view "whole": every index, σ on a log axis;
    "authors": the top `top` indices (their plots: the top spectra.k) with σ on a linear axis."""
    if view not in FIG3_VIEWS:
        raise ValueError(f"Figure 3's view must be one of {list(FIG3_VIEWS)}, got {view!r}")
    style()
    shown = slice(None, top if view == "authors" else None)
    panels = [(title, module, arrays[_layer0(table, modules)[module]])
              for title, (table, arrays) in pairs.items() for module in modules]
    limit = 1.05 * max(float(np.max(np.abs(a["sigma_after"][shown] - a["sigma_before"][shown]), initial=0))
                       for _, _, a in panels) or 1.0
    fig, axes = plt.subplots(len(pairs), len(modules), figsize=(4.2 * len(modules), 3.2 * len(pairs)), squeeze=False)
    for ax, (title, module, a) in zip(axes.flat, panels):
        before, after = a["sigma_before"][shown], a["sigma_after"][shown]
        idx = range(len(before))
        ax.plot(idx, before, lw=2, color="0.6", label="σ before")
        ax.plot(idx, after, lw=1, ls="--", color="#1f77b4", label="σ after")
        if view == "whole":
            ax.set_yscale("log")
        twin = ax.twinx()
        twin.plot(idx, after - before, lw=0.8, color="#d62728", alpha=0.8, label="Δσ")
        twin.axhline(0, color="#d62728", lw=0.5, alpha=0.5)
        twin.set_ylim(-limit, limit)
        twin.set_ylabel("Δσ", color="#d62728")
        twin.grid(False)
        ax.set_title(f"{title}: layer 0 {module}", fontsize=10)
        ax.set_xlabel("singular value index i")
    for row in axes:
        row[0].set_ylabel("σᵢ")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def principal_angle_spectrum(pairs: dict[str, tuple[pd.DataFrame, dict]], module: str = "up_proj") -> plt.Figure:
    """Figure 4 (top row): principal angles (degrees, ascending) between the top-k left and right singular
    subspaces of layer 0's `module`, one curve per pair (the paper: SFT and RL nearly overlap).

    Principal angles come sorted, so the top row rises whatever training did; it cannot say which singular
    vectors turned. The bottom row can: the angle between the i-th singular vector before and after
    (spectra's rot_u, rot_v, claim 4's measure) against the index i."""
    style()
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.6), sharey="row")
    whole = {}  # side -> k, where the top k span the whole space (spectra: the angles are NaN in the table)
    for title, (table, arrays) in pairs.items():
        name = _layer0(table, (module,)).get(module)
        if name is None:
            raise ValueError(f"no layer-0 {module!r} in {title}; its layer-0 matrices: "
                             f"{sorted(_layer0(table, tuple(table['module'].unique())))}")
        row = table[table["name"] == name].iloc[0]
        for ax, below, side in zip(axes[0], axes[1], ("u", "v")):
            ax.plot(np.degrees(arrays[name][f"angles_{side}"]), label=title)
            below.plot(np.degrees(arrays[name][f"rot_{side}"]), lw=0.8, alpha=0.8, label=title)
            if not np.isfinite(row[f"angle_{side}_mean_deg"]):
                whole[side] = row["k"]
    for ax, side in zip(axes[0], ("u", "v")):
        if side in whole:
            ax.text(0.5, 0.5, f"the top {whole[side]} span the whole space:\nevery angle is 0 by construction",
                    transform=ax.transAxes, ha="center", fontsize=8, color="0.3")
    for ax, below, side in zip(axes[0], axes[1], ("left (U)", "right (V)")):
        ax.set_title(f"layer 0 {module}, {side} singular subspace", fontsize=10)
        ax.set_xlabel("principal angle index (sorted)")
        below.set_title(f"each {side[-2]} vector's own turn", fontsize=10)
        below.set_xlabel("singular vector index i")
    axes[0][0].set_ylabel("principal angle (degrees)")
    axes[1][0].set_ylabel("angle(before, after) (degrees)")
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_module_heatmap(table: pd.DataFrame, title: str) -> plt.Figure:
    """Mean principal angle (U side, degrees) and max |Δσ| / σ₁ per layer × module of one pair; a blank
    angle is a module whose top-k left subspace is the whole space (spectra: undefined)."""
    style()
    layers = table[table["layer"] >= 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, 0.28 * layers["layer"].nunique() + 1.5)))
    for ax, (value, label, fmt) in zip(axes, (("angle_u_mean_deg", "mean principal angle (°)", ".0f"),
                                              ("rel_dsigma_absmax", "max |Δσ| / σ₁", ".1e"))):
        grid = layers.pivot_table(index="layer", columns="module", values=value, aggfunc="mean", dropna=False)
        grid = grid[[m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") if m in grid]]
        sns.heatmap(grid, ax=ax, cmap="viridis", annot=len(grid) <= 12, fmt=fmt, annot_kws={"fontsize": 7},
                    cbar_kws={"label": label})
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig


SFT_CURVES = {"id_train": ("ID train", "#1f77b4", "-"), "id_test": ("ID test", "#1f77b4", "--"),
              "ood": ("OOD", "#d62728", "-")}


SYMLOG_LINEAR_TO = 100  # Figure 2's step axis: linear to here, then log (the authors' linthresh)


def sft_loss(table: pd.DataFrame, marks: dict[str, int] | None = None, xscale: str = "symlog") -> plt.Figure:
    """Figure 2: ID train loss, ID test loss and OOD loss (answer tokens only) during SFT, against the step.

    `table` is sft.loss_table's: step, curve (id_train, id_test, ood), loss. `marks` names checkpoints to
    draw as vertical lines, e.g. {"Inter_SFT": 120, "full SFT": 800}; those beyond the last step are left out.
    xscale "symlog" is the authors' axis (sft/sft_scripts/loss-analysis.py: linear to step 100, then log),
    which gives the first 100 steps, where the OOD minimum lies, room; "linear" is the plain one.
    """
    if xscale not in ("symlog", "linear"):
        raise ValueError(f"Figure 2's xscale must be 'symlog' or 'linear', got {xscale!r}")
    style()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for curve, (label, color, ls) in SFT_CURVES.items():
        group = table[table["curve"] == curve].sort_values("step")
        if not group.empty:
            ax.plot(group["step"], group["loss"], color=color, ls=ls, marker="o", ms=3, label=label)
    last = table["step"].max() if not table.empty else 0
    for name, step in (marks or {}).items():
        if step is not None and 0 <= step <= last:
            ax.axvline(step, color="0.45", ls=":", lw=1)
            ax.text(step, 0.98, f" {name}", transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                    fontsize=8, color="0.3")
    ood = table[table["curve"] == "ood"]
    if not ood.empty:
        low = ood.loc[ood["loss"].idxmin()]
        ax.annotate(f"OOD min {low['loss']:.2f} @ {int(low['step'])}", (low["step"], low["loss"]),
                    xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8, color="#d62728")
    symlog = xscale == "symlog" and last > SYMLOG_LINEAR_TO  # a shorter run is all in the linear part
    if symlog:
        ax.set_xscale("symlog", linthresh=SYMLOG_LINEAR_TO)
        ticks = [t for t in (0, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if t <= last]
        ax.set_xticks(ticks, [str(t) for t in ticks])  # the authors' ticks; symlog's own read 10^2
        ax.minorticks_off()
    ax.set_xlabel("SFT step" + (f" (linear to {SYMLOG_LINEAR_TO}, then log)" if symlog else ""))
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("SFT: ID train / ID test / OOD loss")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


PPO_PANELS = {  # metrics.csv column -> panel title (03_ppo)
    "mean_reward": "mean reward per attempt",
    "success_rate": "rollout success rate",
    "value_loss": "value loss",
    "clip_fraction": "clip fraction",
    "approx_kl": "approx. KL to the start policy",
    "entropy": "entropy (nats per token)",
}


def ppo_metrics(table: pd.DataFrame) -> plt.Figure:
    """RL training curves (03_ppo): one panel per metric of PPO_PANELS against the update.

    `table` is rl_dir/metrics.csv: one row per update; panels whose column is missing or empty (e.g. GRPO's
    KL without a reference model) say so instead of plotting.
    """
    style()
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.2), sharex=True)
    for ax, (column, title) in zip(axes.flat, PPO_PANELS.items()):
        values = table[column] if column in table else pd.Series(dtype=float)
        if values.notna().any():
            ax.plot(table["update"], values, marker="o", ms=3, color="#2ca02c")
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="0.5")
        ax.set_title(title, fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("update")
    fig.suptitle("RL from the full-SFT checkpoint: per-update training metrics")
    fig.tight_layout()
    return fig
