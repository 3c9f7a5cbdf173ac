"""The paper's headline quantities from evaluated episodes: the OOD drop from Inter_SFT to full SFT, the
relative drop, and the share of it that RL (or a restore) recovers, with paired-bootstrap intervals over
the test hands. Apart from evaluate, so that a change to the statistics re-reads the cached episodes and
re-evaluates no checkpoint (a stage's code version covers the modules it imports: artifacts.code_hash).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import artifacts, evaluate
from .config import Config


def hand_hits(episodes: pd.DataFrame, rule: str) -> pd.Series:
    """Success per test hand of one rule, indexed and sorted by hand, averaged over repeated passes (0/1
    under greedy decoding): the unit that paired bootstraps resample."""
    e = episodes[episodes["rule"] == rule]
    return e.groupby("hand")["success"].mean().sort_index().astype(float)


def paired_hits(episodes: dict[str, pd.DataFrame], labels: Sequence[str], rule: str) -> dict[str, np.ndarray]:
    """hand_hits of each label as arrays whose position i is the same hand in all, so that one row of
    bootstrap_indices draws the same hands from every checkpoint. ArtifactError where the checkpoints'
    episodes cover different hands: a paired statistic over unpaired data would be silently wrong."""
    hits = {label: hand_hits(episodes[label], rule) for label in dict.fromkeys(labels)}
    first, *others = hits
    for label in others:
        if not hits[label].index.equals(hits[first].index):
            shared = len(hits[label].index.intersection(hits[first].index))
            raise artifacts.ArtifactError(
                f"the {rule} episodes of {first} and {label} cover different hands ({len(hits[first])} and "
                f"{len(hits[label])}, {shared} in both), so they cannot be paired; {evaluate.REEVALUATE}")
    return {label: h.to_numpy() for label, h in hits.items()}


def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) hand indices; the same rows index every checkpoint's hits, so the bootstrap is paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def interval(name: str, samples: np.ndarray) -> dict[str, float]:
    """{name_ci_low, name_ci_high}: the 95% percentile interval of the finite bootstrap samples (NaN if none),
    as two float columns so that the tables stay tidy."""
    finite = samples[np.isfinite(samples)]
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (float("nan"), float("nan"))
    return {f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}


def selection_interval(name: str, chosen: int, points: np.ndarray, samples: np.ndarray) -> dict[str, float]:
    """{name_ci_low, name_ci_high} for candidate `chosen` when it was picked among all of `points` (one per
    candidate; `samples`: candidates x draws of the same paired bootstrap) by looking at the same hands. A
    percentile interval of the picked one alone would forget the picking: among ten equal checkpoints the
    best beats full SFT "significantly" several times too often. This is a max-type bootstrap band instead,
    valid for every candidate at once and so for the picked one: each bound moves by the 97.5th percentile
    of the largest deviation over the candidates (NaN where a candidate's quantity is undefined)."""
    deviation = samples - points[:, None]
    deviation = deviation[:, ~np.isnan(deviation).all(0)]
    if not deviation.size or not np.isfinite(points[chosen]):
        return {f"{name}_ci_low": float("nan"), f"{name}_ci_high": float("nan")}
    over = np.percentile(np.nanmax(deviation, axis=0), 97.5)
    under = np.percentile(np.nanmax(-deviation, axis=0), 97.5)
    return {f"{name}_ci_low": float(points[chosen] - over), f"{name}_ci_high": float(points[chosen] + under)}


SHARE_BOUNDED_FROM = 0.975  # the share of draws with a drop below which the share's 95% interval is unbounded


def drop_and_share(episodes: dict[str, pd.DataFrame], inter: str, full: str, rl: str | None, rule: str = "ood",
             n_boot: int = 2000, seed: int = 0, selected_from: Sequence[str] = ()) -> dict:
    """The paper's quantities on one rule: the drop from Inter_SFT to full SFT and the share of it that
    RL recovers, (rl - full) / (inter - full), with 95% intervals (`<name>_ci_low`, `<name>_ci_high`) from a
    paired bootstrap over hands. `selected_from`: the SFT checkpoints Inter_SFT was picked among on these
    OOD hands (Named.inter_candidates); then the OOD drop and relative drop get selection_interval's band.
    The share's interval stays conditional on the pick (which tends to overrate the drop, and so to lower
    the share); on ID hands Inter_SFT was not picked, so no band is needed. Where more than 2.5% of the
    draws show no drop, the share's 95% interval is unbounded (-inf, inf): a ratio whose denominator may be
    0 has no finite bound (Fieller), and dropping those draws would narrow it falsely. share_defined_in is
    the fraction of draws with a drop."""
    pool = [label for label in dict.fromkeys(selected_from) if label != full] if rule == "ood" else []
    hits = paired_hits(episodes, [inter, full, *([rl] if rl else []), *pool], rule)
    a, b, c = hits[inter], hits[full], hits[rl] if rl else None
    idx = bootstrap_indices(len(a), n_boot, seed)
    drop = a.mean() - b.mean()
    boot_drop = a[idx].mean(1) - b[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_relative = np.where(a[idx].mean(1) > 0, boot_drop / a[idx].mean(1), np.nan)
    result = {"rule": rule, "inter_sft": inter, "full_sft": full, "rl": rl,
              "inter_rate": a.mean(), "full_rate": b.mean(), "drop": drop, **interval("drop", boot_drop),
              # the paper's "relative OOD drop", (Inter_SFT - full SFT) / Inter_SFT: 48% Llama, 13% Qwen
              "relative_drop": drop / a.mean() if a.mean() > 0 else float("nan"),
              **interval("relative_drop", boot_relative)}
    result["inter_candidates"] = len(pool) if inter in pool else 1
    if inter in pool and len(pool) > 1:
        rates = np.array([hits[label].mean() for label in pool])
        boot_rates = np.stack([hits[label][idx].mean(1) for label in pool])
        drops, boot_drops = rates - b.mean(), boot_rates - b[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(rates > 0, drops / rates, np.nan)
            boot_relatives = np.where(boot_rates > 0, boot_drops / boot_rates, np.nan)
        chosen = pool.index(inter)
        result.update(selection_interval("drop", chosen, drops, boot_drops),
                      **selection_interval("relative_drop", chosen, relative, boot_relatives))
    if c is not None:
        gain, boot_gain = c.mean() - b.mean(), c[idx].mean(1) - b[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_share = np.where(boot_drop > 0, boot_gain / boot_drop, np.nan)
        defined = float(np.isfinite(boot_share).mean())
        share_band = interval("share", boot_share) if defined >= SHARE_BOUNDED_FROM else \
            {"share_ci_low": -np.inf, "share_ci_high": np.inf}
        result.update(rl_rate=c.mean(), gain=gain, **interval("gain", boot_gain),
                      share_recovered=gain / drop if drop > 0 else float("nan"), **share_band,
                      share_defined_in=defined)
    return result


def headline(cfg: Config, named: evaluate.Named, write: bool = True) -> pd.DataFrame:
    """The paper's headline quantities per rule (OOD first): Inter_SFT, full SFT and RL success, the drop
    and the relative drop (Inter_SFT - full SFT) / Inter_SFT, and RL's share of the drop recovered, with
    paired-bootstrap intervals (the OOD drop's allowing for Inter_SFT's pick). Written to
    runs/<preset>/eval/recovery.csv (04_eval) unless write=False (claims, which only reads)."""
    labels = {named.inter_sft, named.full_sft, named.rl, *named.inter_candidates} - {None}
    episodes = {label: evaluate.episodes_table(artifacts.eval_dir(cfg) / label) for label in labels}
    table = pd.DataFrame([drop_and_share(episodes, named.inter_sft, named.full_sft, named.rl, rule=rule,
                                   selected_from=named.inter_candidates)
                          for rule in ("ood", "id")]).set_index("rule")
    if write:
        artifacts.write_table(table, artifacts.recovery_table(cfg), index=True)
    return table
