"""Figures: what each draws is read back from its artists (lines, bars, axis limits), on small made-up tables."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from paper_lib import evaluate, plots

RATES = {  # label: (stage, step, id rate, ood rate); SFT goes on after full SFT (sft-0040), as in the paper's runs
    "base": ("base", 0, 0.10, 0.08), "sft-0010": ("sft", 10, 0.30, 0.20), "sft-0020": ("sft", 20, 0.40, 0.18),
    "sft-0040": ("sft", 40, 0.50, 0.12), "sft-0080": ("sft", 80, 0.55, 0.09),
    "rl-0005": ("rl", 5, 0.52, 0.16), "rl-0010": ("rl", 10, 0.51, 0.17)}
NAMED = evaluate.Named("base", "sft-0010", "sft-0040", "rl-0010")


def success_table() -> pd.DataFrame:
    rows = [{"label": label, "stage": stage, "step": step, "rule": rule, "success_rate": rate,
             "ci_low": rate - 0.02, "ci_high": rate + 0.03}
            for label, (stage, step, id_rate, ood_rate) in RATES.items()
            for rule, rate in (("id", id_rate), ("ood", ood_rate))]
    return pd.DataFrame(rows)


def points(ax) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)) for line in ax.get_lines()]


def test_figure1_starts_rl_at_the_full_sft_checkpoint_and_draws_the_authors_three_stages():
    fig = plots.success_across_checkpoints(success_table(), named=NAMED)
    curve, bars = fig.axes
    order = list(RATES)
    full, first_rl = order.index("sft-0040"), order.index("rl-0005")
    ood = 100 * np.array([RATES[label][3] for label in order])
    lines = points(curve)
    # RL's line is joined to full SFT's point, and no line joins the last SFT step to RL
    assert any(np.array_equal(x, [full, first_rl]) and np.allclose(y, ood[[full, first_rl]]) for x, y in lines)
    assert not any(order.index("sft-0080") in x and first_rl in x for x, _ in lines)
    assert any(np.array_equal(x, [full, full]) for x, _ in lines)  # the full-SFT mark
    heights = sorted(round(p.get_height(), 6) for p in bars.patches)
    expected = sorted(round(100 * RATES[label][k], 6) for label in ("sft-0010", "sft-0040", "rl-0010") for k in (2, 3))
    assert heights == expected
    plt.close(fig)


def test_figure1_without_named_checkpoints_is_the_curve_alone():
    fig = plots.success_across_checkpoints(success_table())
    assert len(fig.axes) == 1
    plt.close(fig)


def spectra_pairs(scale_rl: float, n: int = 40) -> dict:
    """Two pairs of layer-0 q/k/v spectra; RL's Δσ is scale_rl times SFT's."""
    rng = np.random.default_rng(0)
    pairs = {}
    for title, scale in (("SFT", 1.0), ("RL", scale_rl)):
        table = pd.DataFrame({"layer": 0, "module": ["q_proj", "k_proj", "v_proj"], "block": "self_attn",
                              "name": [f"l0.{m}" for m in ("q", "k", "v")]})
        arrays = {}
        for name in table["name"]:
            before = np.sort(rng.uniform(0.1, 2.0, n))[::-1]
            arrays[name] = {"sigma_before": before, "sigma_after": before + scale * rng.normal(0, 0.01, n)}
        pairs[title] = (table, arrays)
    return pairs


def test_figure3_gives_every_delta_sigma_axis_the_same_symmetric_limits():
    pairs = spectra_pairs(scale_rl=0.05)
    fig = plots.singular_values(pairs)
    largest = max(np.abs(a["sigma_after"] - a["sigma_before"]).max() for _, arrays in pairs.values()
                  for a in arrays.values())
    twins = [ax for ax in fig.axes if ax.get_ylabel() == "Δσ"]
    assert len(twins) == 6
    for ax in twins:
        low, high = ax.get_ylim()
        assert low == pytest.approx(-high) and high == pytest.approx(1.05 * largest)
    plt.close(fig)


def test_figure3_authors_view_shows_the_top_indices_on_a_linear_axis():
    fig = plots.singular_values(spectra_pairs(scale_rl=1.0), view="authors", top=16)
    sigma_axes = [ax for ax in fig.axes if ax.get_ylabel() != "Δσ"]
    assert all(ax.get_yscale() == "linear" for ax in sigma_axes)
    assert all(len(line.get_xdata()) == 16 for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 2)
    plt.close(fig)
    with pytest.raises(ValueError, match="view"):
        plots.singular_values(spectra_pairs(scale_rl=1.0), view="top")


def test_figure4_draws_the_asked_module_and_names_the_ones_there_when_it_is_absent():
    pairs = {}
    for title in ("SFT", "RL"):
        table, arrays = spectra_pairs(scale_rl=1.0)[title]
        table = table.assign(angle_u_mean_deg=30.0, angle_v_mean_deg=30.0, k=8)
        for name in arrays:
            arrays[name].update(angles_u=np.linspace(0.4, 1.5, 8), angles_v=np.linspace(0.5, 1.5, 8),
                                rot_u=np.full(40, 0.3), rot_v=np.full(40, 0.2))
        pairs[title] = (table, arrays)
    fig = plots.principal_angle_spectrum(pairs, module="k_proj")
    assert fig.axes[0].get_title() == "layer 0 k_proj, left (U) singular subspace"
    assert len(fig.axes[0].get_lines()) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match=r"no layer-0 'up_proj' in SFT; its layer-0 matrices: \['k_proj', 'q_proj', 'v_proj'\]"):
        plots.principal_angle_spectrum(pairs, module="up_proj")


def test_figure6_places_the_ranks_on_a_log2_axis():
    table = pd.DataFrame([{"x": str(k), "variant": "v", "rule": rule, "success_rate": 0.1, "ci_low": 0.05,
                           "ci_high": 0.2, "claim_point": False} for k in (256, 512, 717, 1024) for rule in ("id", "ood")])
    refs = pd.DataFrame([{"name": "full SFT", "rule": rule, "success_rate": 0.05} for rule in ("id", "ood")])
    fig = plots.restore_success(table, refs, "k", "t", numeric=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    xs = next(x for x, _ in points(ax) if len(x) == 4)
    assert np.allclose(xs, [256, 512, 717, 1024])  # one variant: no dodge
    plt.close(fig)


def test_figure7_draws_the_reference_levels_over_each_test_set():
    table = pd.DataFrame([{"variant": v, "rule": rule, "success_rate": r, "ci_low": r - 0.01, "ci_high": r + 0.01}
                          for v, r in (("RL", 0.16), ("RL with SFT's directions", 0.11)) for rule in ("id", "ood")])
    refs = pd.DataFrame([{"name": "full SFT", "rule": "id", "success_rate": 0.5},
                         {"name": "full SFT", "rule": "ood", "success_rate": 0.09}])
    fig = plots.causal(table, refs)
    levels = sorted(float(seg[0][1]) for coll in fig.axes[0].collections if hasattr(coll, "get_segments")
                    for seg in coll.get_segments() if len(seg) == 2 and seg[0][1] == seg[1][1])
    assert levels == pytest.approx([9.0, 50.0])
    plt.close(fig)


def test_figure2_uses_the_authors_symlog_step_axis_unless_asked_for_linear():
    table = pd.DataFrame([{"step": s, "curve": c, "loss": 1.0 / (1 + s)} for s in (0, 50, 100, 400, 1600)
                          for c in ("id_train", "id_test", "ood")])
    ax = plots.sft_loss(table).axes[0]
    assert ax.get_xscale() == "symlog"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "20", "50", "100", "200", "500", "1000"]
    assert plots.sft_loss(table, xscale="linear").axes[0].get_xscale() == "linear"
    short = table[table["step"] <= 100]  # tiny's 64 steps: all in the linear part, so a plain axis
    assert plots.sft_loss(short).axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="xscale"):
        plots.sft_loss(table, xscale="log")
    plt.close("all")
