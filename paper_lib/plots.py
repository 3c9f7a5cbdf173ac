"""Figures: one function per paper figure (added by the stage that makes it) and one `save_figure`.

Plotting reads tables only, so a figure can be restyled without recomputing anything. Every saved
figure gets a png, a pdf and a JSON sidecar saying what made it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from . import artifacts
from .config import Config

RULE_COLORS = {"id": "#1f77b4", "ood": "#d62728"}


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig: plt.Figure, name: str, cfg: Config, notebook: str,
                sources: list[str] | None = None, **extra: Any) -> Path:
    """Write figures/<preset>/<name>.png, .pdf and .json (notebook, preset, config hash, code version,
    the tables it was drawn from); returns the png path."""
    out = artifacts.figures_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    sidecar = {
        "figure": name,
        "notebook": notebook,
        "preset": cfg.preset,
        "config_hash": cfg.section_hash(),
        "code_version": artifacts.git_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": [str(s) for s in sources or []],
        **extra,
    }
    (out / f"{name}.json").write_text(json.dumps(sidecar, indent=2, default=str))
    return png


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
