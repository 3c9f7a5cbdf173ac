"""The restore experiments: which restores Figures 5-7 make (the layer and rank sweeps into full SFT,
06_restore; the causal test, 07_causal), and those restored checkpoints written (restore), evaluated
(evaluate) and tabulated. Apart from restore, so that a restored checkpoint's code version covers only the
code that writes its weights: a change to the game, to evaluation or to the sweeps' design re-evaluates or
adds restored checkpoints and rewrites none (qwen7b's are 792 GB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd

from . import artifacts, evaluate, recovery, restore
from .config import Config


def layer_blocks(num_layers: int, block: int) -> list[tuple[int, int]]:
    """Consecutive inclusive layer ranges of `block` layers (the paper: 0-9, 10-19, ...)."""
    if block < 1:
        raise ValueError("restore.layer_block must be >= 1")
    return [(a, min(a + block, num_layers) - 1) for a in range(0, num_layers, block)]


def layer_prefixes(num_layers: int, step: int) -> list[tuple[int, int]]:
    """Inclusive layer ranges from layer 0 that grow by `step` layers (the authors' 0-4, 0-9, ..., 0-39)."""
    return [(0, b) for _, b in layer_blocks(num_layers, step)]


def claim_points(num_layers: int, hidden: int) -> tuple[tuple[int, int], int]:
    """The settings of the paper's claim: the first 25% of the layers, (0, L/4 - 1), at least one layer
    (0-6 of Qwen's 28), and the top 20% of the ranks, 20% of the hidden size (717 for Qwen, 819 for Llama)."""
    return (0, max(1, num_layers // 4) - 1), max(1, round(0.2 * hidden))


def sweeps(cfg: Config, num_layers: int, hidden: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Figure 5's layer ranges (restore.layer_sweep: blocks or prefixes of restore.layer_block layers) and
    Figure 6's top-k sweep (restore.top_ks), each with the claim's point added, so the claim is always measured."""
    first_quarter, top20 = claim_points(num_layers, hidden)
    ranges = layer_prefixes if cfg.restore.layer_sweep == "prefixes" else layer_blocks
    layers = sorted(set(ranges(num_layers, cfg.restore.layer_block)) | {first_quarter})
    return layers, sorted(set(cfg.restore.top_ks) | {top20})


@dataclass(frozen=True)
class Variant:
    """One restore experiment: whose directions (source: base or inter_sft) and whose σ (keep)."""

    source: str
    keep: str

    @property
    def name(self) -> str:
        return f"{self.source}.{self.keep}"


def variants(cfg: Config) -> list[Variant]:
    """restore.sources x restore.keeps (config.load has checked both against their choices)."""
    return [Variant(source, keep) for source in cfg.restore.sources for keep in cfg.restore.keeps]


def causal_plans(cfg: Config) -> dict[str, restore.Plan]:
    """The causal test's restores of the SFT model's directions into the RL model, by name: every rank of
    every matrix with the RL model's σ (the paper's text), and for each restore.causal_top_ks the authors'
    svd_recover_dir run (top k, keep="target-sigma-reset"; theirs used 2560, 3072 and 3584)."""
    return {"every rank": restore.Plan(), **{f"top {k}": restore.Plan(top=k, keep="target-sigma-reset")
                                     for k in cfg.restore.causal_top_ks}}


class Job(NamedTuple):
    """One restored checkpoint of the sweeps: its variant, where it sits in Figure 5 or 6, and what it restores."""

    variant: Variant
    kind: str  # "layers" (Figure 5) or "ranks" (Figure 6)
    setting: str  # "0-9", or "512"
    claim_point: bool  # the first 25% of the layers, or the top 20% of the ranks
    source: artifacts.Checkpoint
    plan: restore.Plan
    label: str  # its directory under runs/<preset>/restore/ and its evaluation label


def sweep_jobs(cfg: Config, named: evaluate.Named, by_label: dict[str, artifacts.Checkpoint]) -> list[Job]:
    """Every variant's layer and rank sweeps into the full-SFT checkpoint, as restores to make."""
    num_layers, hidden = restore.model_dims(by_label[named.full_sft].path)
    layer_ranges, top_ks = sweeps(cfg, num_layers, hidden)
    first_quarter, top20 = claim_points(num_layers, hidden)
    jobs = []
    for variant in variants(cfg):
        source = by_label[named.base if variant.source == "base" else named.inter_sft]
        for a, b in layer_ranges:
            plan = restore.Plan(layers=(a, b), keep=variant.keep, with_embeddings=cfg.restore.layers_include_embeddings)
            jobs.append(Job(variant, "layers", f"{a}-{b}", (a, b) == first_quarter, source, plan,
                            f"{variant.name}.layers-{a:02d}-{b:02d}"))
        for k in top_ks:
            jobs.append(Job(variant, "ranks", str(k), k == top20, source, restore.Plan(top=k, keep=variant.keep),
                            f"{variant.name}.top-{k:04d}"))
    return jobs


SHARE_COLUMNS = ("share_recovered", "share_ci_low", "share_ci_high", "share_defined_in")


def run_sweeps(cfg: Config, named: evaluate.Named, force: bool = False) -> pd.DataFrame:
    """The sweeps (sweep_jobs) restored and evaluated: one row per (variant, restored checkpoint, rule) with
    success and its interval, and for OOD the share of the Inter_SFT -> full SFT drop it recovers, with a
    paired-bootstrap interval. Written to runs/<preset>/restore/variants.csv."""
    by_label = evaluate.checkpoints_by_label(cfg)
    target = by_label[named.full_sft]
    jobs = sweep_jobs(cfg, named, by_label)
    restored = [restore.restored_checkpoint(cfg, job.label, target, job.source, job.plan, force) for job in jobs]
    table = evaluate.sweep(cfg, force=force, checkpoints=restored, table_name=artifacts.RESTORE_RESULTS)
    episodes = {label: evaluate.episodes_table(artifacts.eval_dir(cfg) / label)
                for label in {named.inter_sft, named.full_sft, *(job.label for job in jobs)}}
    rows = []
    for job in jobs:
        share = recovery.drop_and_share(episodes, named.inter_sft, named.full_sft, job.label, rule="ood")
        for _, r in table[table["label"] == job.label].iterrows():
            rows.append({"variant": job.variant.name, "source": job.variant.source, "source_label": job.source.label,
                         "keep": job.variant.keep, "kind": job.kind, "setting": job.setting,
                         "claim_point": job.claim_point, "label": job.label, "rule": r["rule"],
                         "success_rate": r["success_rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "episodes": r["episodes"],
                         **({key: share[key] for key in SHARE_COLUMNS} if r["rule"] == "ood" else {})})
    out = pd.DataFrame(rows)
    artifacts.write_table(out, artifacts.variants_table(cfg))
    return out


def run_causal(cfg: Config, table: pd.DataFrame, named: evaluate.Named, force: bool = False) -> pd.DataFrame:
    """The causal test: the RL model (its row of 04_eval's `table`, evaluate.load_results), and the RL model
    with the full-SFT model's directions imposed by each of causal_plans, evaluated; one row per (variant,
    rule) with its success and interval, the RL model first. The imposed checkpoints' table is
    runs/<preset>/eval/causal_results.parquet."""
    if not named.rl:
        raise FileNotFoundError("no RL checkpoint: run 03_ppo (and 04_eval) first")
    by_label = evaluate.checkpoints_by_label(cfg)
    rl, full = by_label[named.rl], by_label[named.full_sft]
    imposed = {}
    for name, plan in causal_plans(cfg).items():
        label = f"causal-{rl.label}-with-{full.label}-directions" + ("" if plan.top is None else f"-top-{plan.top:04d}")
        imposed[name] = restore.restored_checkpoint(cfg, label, rl, full, plan, force)
    causal = evaluate.sweep(cfg, force=force, checkpoints=list(imposed.values()), table_name=artifacts.CAUSAL_RESULTS)
    rows = [table[table["label"] == rl.label].assign(variant=f"RL ({rl.label})")]
    for name, checkpoint in imposed.items():
        whole = f": {full.label}'s weights" if restore.replaced_whole(checkpoint.path) else ""
        rows.append(causal[causal["label"] == checkpoint.label].assign(
            variant=f"RL with {full.label}'s directions ({name}){whole}"))
    return pd.concat(rows, ignore_index=True)
