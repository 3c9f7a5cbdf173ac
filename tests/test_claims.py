"""paper_lib.claims: each claim's quantity and verdict from hand-made run tables whose answer is known."""
import json

import numpy as np
import pandas as pd
import pytest

from paper_lib import artifacts, claims, config, evaluate


def _write_eval(cfg, rates: dict[str, tuple[str, int, float, float]], hands: int = 200) -> None:
    """results.parquet and per-label episodes: label -> (stage, step, ID rate, OOD rate); hand i succeeds
    when i < rate * hands, so checkpoints are paired by hand as in a real run."""
    rows = []
    for label, (stage, step, id_rate, ood_rate) in rates.items():
        episodes = [{"rule": rule, "hand": i, "success": i < rate * hands}
                    for rule, rate in (("id", id_rate), ("ood", ood_rate)) for i in range(hands)]
        out = artifacts.eval_dir(cfg) / label
        out.mkdir(parents=True)
        pd.DataFrame(episodes).to_json(out / "episodes.jsonl", orient="records", lines=True)
        rows += [{"label": label, "stage": stage, "step": step, "rule": rule, "success_rate": rate,
                  **dict(zip(("ci_low", "ci_high"), evaluate.wilson_interval(round(rate * hands), hands)))}
                 for rule, rate in (("id", id_rate), ("ood", ood_rate))]
    pd.DataFrame(rows).to_parquet(artifacts.eval_dir(cfg) / "results.parquet")


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path))
    return config.load("tiny", sft__full_sft_step=80)


def test_an_early_peak_a_drop_and_a_recovery_hold_and_a_flat_run_does_not(run):
    # OOD 40% at step 20, 20% at full SFT (80), 37% after RL: 17 of the 20 points lost come back
    _write_eval(run, {"base": ("base", 0, 0.5, 0.30), "sft-0020": ("sft", 20, 0.6, 0.40),
                      "sft-0080": ("sft", 80, 0.9, 0.20), "rl-0010": ("rl", 10, 0.88, 0.37)})
    one, two = claims.sft_peak_and_rl_recovery(run)
    assert one["verdict"] == claims.HOLDS and "sft-0020" in one["measured"] and "drop 20.0%" in one["measured"]
    assert two["verdict"] == claims.HOLDS and "85.0%" in two["measured"]  # (37 - 20) / (40 - 20)
    assert "ID change from full SFT -2.0%" in two["measured"]
    row = claims.headline_row(run).split(" | ")
    assert row[2].startswith("sft-0020: 40.0% [") and row[3].startswith("sft-0080: 20.0% [")
    assert row[5].startswith("50.0% [") and row[6].startswith("85.0% [")  # relative drop, share recovered
    assert not artifacts.recovery_table(run).exists()  # claims only reads: 04_eval writes recovery.csv


def test_a_peak_at_full_sft_is_no_early_peak(run):
    _write_eval(run, {"base": ("base", 0, 0.5, 0.1), "sft-0020": ("sft", 20, 0.6, 0.2),
                      "sft-0080": ("sft", 80, 0.9, 0.3), "rl-0010": ("rl", 10, 0.9, 0.3)})
    one, two = claims.sft_peak_and_rl_recovery(run)
    assert one["verdict"] == claims.FAILS and two["verdict"] == claims.UNSURE  # no drop: no share to judge


def test_the_causal_test_reads_the_paired_change(run):
    """One row per causal restore (every rank, then each restore.causal_top_ks), each against the RL model."""
    _write_eval(run, {"base": ("base", 0, 0.5, 0.1), "sft-0080": ("sft", 80, 0.9, 0.1),
                      "rl-0010": ("rl", 10, 0.9, 0.30), "causal-x": ("restore", 0, 0.9, 0.15),
                      "causal-x-top-0008": ("restore", 0, 0.9, 0.30)})
    pd.DataFrame([{"label": label, "rule": rule} for label in ("causal-x", "causal-x-top-0008")
                  for rule in ("id", "ood")]).to_parquet(artifacts.eval_dir(run) / "causal_results.parquet")
    whole = artifacts.restore_dir(run) / "causal-x-top-0008"  # k = 8 reached every matrix's rank
    whole.mkdir(parents=True)
    (whole / "restore_manifest.json").write_text(json.dumps({"plan": {"keep": "target-sigma-reset"}, "restored": [
        {"name": "q", "top": 8, "tail": 0, "rank": 8}, {"name": "k", "top": 4, "tail": 0, "rank": 4}]}))
    every, top = claims.causal_test(run)
    assert every["verdict"] == claims.HOLDS and "change -15.0%" in every["measured"]
    assert top["verdict"] != claims.HOLDS and "change 0.0%" in top["measured"]
    assert "not a direction restore" in top["measured"] and "not a direction restore" not in every["measured"]


def _svd_pair(rescale: float, turn: float, n: int = 24, seed: int = 0):
    """A matrix and a changed copy: σ scaled by `rescale`, the left singular vectors turned by `turn` rad
    in the planes of pairs of indices; the table row and arrays that 05_spectra writes for them."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.linspace(2.0, 0.5, n)
    G = np.eye(n)
    for i in range(0, n - 1, 2):
        c, si = np.cos(turn), np.sin(turn)
        G[i:i + 2, i:i + 2] = [[c, -si], [si, c]]
    before, after = U @ np.diag(s) @ V.T, (U @ G) @ np.diag(s * rescale) @ V.T
    table = pd.DataFrame([{"name": "w", "fro_delta": np.linalg.norm(after - before)}])
    arrays = {"w": {"sigma_before": np.linalg.svd(before, compute_uv=False),
                    "sigma_after": np.linalg.svd(after, compute_uv=False)}}
    return table, arrays


def test_sigma_share_tells_a_rescaling_from_a_rotation():
    assert claims.sigma_share(*_svd_pair(rescale=1.1, turn=0.0)).iloc[0] == pytest.approx(1.0)
    assert claims.sigma_share(*_svd_pair(rescale=1.0, turn=0.3)).iloc[0] == pytest.approx(0.0, abs=1e-12)
    mixed = claims.sigma_share(*_svd_pair(rescale=1.01, turn=0.3)).iloc[0]
    assert 0 < mixed < 0.1  # Mirsky: never above 1


def test_the_mean_angle_leaves_out_matrices_whose_top_k_is_the_whole_space():
    # NaN: spectra's whole-space marker; the last matrix did not change (Llama's cross-attention)
    table = pd.DataFrame({"angle_u_mean_deg": [10.0, np.nan, 30.0, 0.0], "fro_delta": [1.0, 1.0, 1.0, 0.0]})
    assert claims._angle(table).startswith("20.0° ") and "the 2 of 4 matrices" in claims._angle(table)
    assert claims._angle(table.assign(angle_u_mean_deg=np.nan)).startswith("undefined")


def test_claim_modules_choose_the_matrices_claims_3_and_4_pool(monkeypatch):
    """spectra.claim_modules: () pools every 2-D weight (PAPER_SPEC 5); the authors' angle script read
    q/k/v/down_proj only. A rotated q_proj and a rescaled up_proj: σ's share is 0% of one, 100% of the two."""
    (turned, t_arrays), (scaled, s_arrays) = _svd_pair(rescale=1.0, turn=0.3), _svd_pair(rescale=1.1, turn=0.0)
    table = pd.concat([turned.assign(name="q", module="q_proj"), scaled.assign(name="up", module="up_proj")],
                      ignore_index=True).assign(rel_dsigma_absmax=0.01, angle_u_mean_deg=10.0, k=24, rank=24)
    arrays = {"q": {**t_arrays["w"], "rot_u": np.zeros(24)}, "up": {**s_arrays["w"], "rot_u": np.zeros(24)}}
    monkeypatch.setattr(claims, "_paper_pairs", lambda cfg, results: [("SFT", "base", "sft-0080")])
    monkeypatch.setattr(claims.spectra, "load_pair", lambda out, a, b: (table, arrays))
    pooled = claims.sigma_and_rotation(config.load("tiny"))[0]
    assert "median of 2 matrices" in pooled["measured"] and pooled["case"] == "SFT: base → sft-0080"
    upstream = claims.sigma_and_rotation(config.load("tiny", spectra__claim_modules=["q_proj", "k_proj"]))[0]
    assert upstream["measured"].startswith("σ accounts for 0.0% of ‖ΔW‖F² (median of 1 matrices")
    assert upstream["case"] == "SFT: base → sft-0080 (q_proj, k_proj)" and upstream["verdict"] == claims.HOLDS


def _rotations(edge_deg: float, bulk_deg: float, matrices: int = 12, k: int = 50):
    rng = np.random.default_rng(1)
    names = [f"m{i}" for i in range(matrices)]
    arrays = {}
    for name in names:
        rot = np.full(k, bulk_deg) + rng.normal(0, 0.5, k)
        rot[:5] += edge_deg - bulk_deg
        rot[-5:] += edge_deg - bulk_deg
        arrays[name] = {"rot_u": np.radians(rot)}
    return pd.DataFrame({"name": names, "k": k, "rank": k, "fro_delta": 1.0}), arrays


def test_rotation_at_both_ends_of_the_spectrum_holds_and_a_uniform_one_does_not():
    assert claims._edge_rotation("SFT", "a", "b", *_rotations(30, 5))["verdict"] == claims.HOLDS
    assert claims._edge_rotation("SFT", "a", "b", *_rotations(5, 30))["verdict"] == claims.FAILS
    table, arrays = _rotations(30, 5)  # the principal angles' k does not limit the rotations (every index)
    assert claims._edge_rotation("SFT", "a", "b", table.assign(k=10), arrays)["verdict"] == claims.HOLDS
    frozen = table.assign(fro_delta=0.0)  # matrices that did not train are no evidence either way
    assert "enough singular vectors" in claims._edge_rotation("SFT", "a", "b", frozen, arrays)["measured"]
    table, arrays = _rotations(30, 5, k=2)  # two singular vectors: no top, bulk and bottom to tell apart
    row = claims._edge_rotation("SFT", "a", "b", table, arrays)
    assert row["verdict"] == claims.UNSURE and "enough singular vectors" in row["measured"]


@pytest.mark.parametrize("low, high, verdict", [(0.72, 0.79, claims.HOLDS), (0.55, 0.75, claims.UNSURE),
                                                (0.2, 0.6, claims.FAILS), (0.85, 0.95, claims.HOLDS),
                                                (0.25, 0.7, claims.FAILS),
                                                (-0.5, 1.2, claims.UNSURE), (np.nan, np.nan, claims.UNSURE),
                                                (-np.inf, np.inf, claims.UNSURE)])
def test_restore_claim_rule(run, low, high, verdict):
    path = artifacts.restore_dir(run) / "variants.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame([{"variant": "base.target-sigma", "kind": "ranks", "setting": "13", "claim_point": True,
                   "rule": "ood", "success_rate": 0.3, "share_recovered": (low + high) / 2,
                   "share_ci_low": low, "share_ci_high": high}]).to_csv(path, index=False)
    (row,) = claims.restore_recovery(run)
    assert row["verdict"] == verdict and "top 20% of ranks" in row["paper"]
    assert ("unbounded" in row["measured"]) == np.isinf(low)  # through the CSV and back


def test_a_stage_not_yet_run_is_a_row_that_names_its_notebook(run):
    frame = claims.table(run)
    assert (frame["verdict"] == claims.UNSURE).all()
    assert frame["measured"].str.contains("run notebooks 01-04").any()
    assert frame["measured"].str.contains("06_restore").any()


def test_a_report_reads_and_checks_04s_results_once(run, monkeypatch):
    """Every part of the report used to read (and check) 04_eval's results itself: five reads, and any
    warning of the check five times over."""
    _write_eval(run, {"base": ("base", 0, 0.5, 0.30), "sft-0020": ("sft", 20, 0.6, 0.40),
                      "sft-0080": ("sft", 80, 0.9, 0.20), "rl-0010": ("rl", 10, 0.88, 0.37)})
    reads = []
    load = evaluate.load_results
    monkeypatch.setattr(evaluate, "load_results", lambda cfg: reads.append(cfg) or load(cfg))
    text = claims.report(run)
    assert len(reads) == 1
    assert "| sft-0020: 40.0% [" in text and "drop 20.0%" in text and "not measured" in text  # 05-07 not run
    assert claims.table(run, load(run)).equals(claims.table(run)) and len(reads) == 2
