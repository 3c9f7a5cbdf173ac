"""The restore experiments: restored checkpoints written (restore), evaluated (evaluate) and tabulated,
for Figures 5-6 (the layer and rank sweeps into full SFT, 06_restore) and Figure 7 (the causal test,
07_causal). Apart from restore, so that a restored checkpoint's code version covers only the code that
writes its weights: a change to the game or to evaluation re-evaluates the restored checkpoints and
rewrites none (qwen7b's are 792 GB).
"""
from __future__ import annotations

import pandas as pd

from . import artifacts, evaluate, recovery, restore
from .config import Config


def run_sweeps(cfg: Config, named: evaluate.Named, force: bool = False) -> pd.DataFrame:
    """Every variant's layer and rank sweeps into the full-SFT checkpoint, evaluated: one row per
    (variant, restored checkpoint, rule) with success and its interval, and for OOD the share of the
    Inter_SFT -> full SFT drop it recovers, with a paired-bootstrap interval. Written to
    runs/<preset>/restore/variants.csv."""
    by_label = evaluate.checkpoints_by_label(cfg)
    target = by_label[named.full_sft]
    num_layers, hidden = restore.model_dims(target.path)
    layer_ranges, top_ks = restore.sweeps(cfg, num_layers, hidden)
    first_quarter, top20 = restore.claim_points(num_layers, hidden)
    jobs = []
    for variant in restore.variants(cfg):
        source = by_label[named.base if variant.source == "base" else named.inter_sft]
        for a, b in layer_ranges:
            plan = restore.Plan(layers=(a, b), keep=variant.keep, with_embeddings=cfg.restore.layers_include_embeddings)
            jobs.append((variant, "layers", f"{a}-{b}", (a, b) == first_quarter, source, plan,
                         f"{variant.name}.layers-{a:02d}-{b:02d}"))
        for k in top_ks:
            jobs.append((variant, "ranks", str(k), k == top20, source, restore.Plan(top=k, keep=variant.keep),
                         f"{variant.name}.top-{k:04d}"))
    restored = [restore.restored_checkpoint(cfg, label, target, source, plan, force)
                for _, _, _, _, source, plan, label in jobs]
    table = evaluate.sweep(cfg, force=force, checkpoints=restored, table_name=artifacts.RESTORE_RESULTS)
    eval_dir = artifacts.eval_dir(cfg)
    episodes = {label: evaluate.episodes_table(eval_dir / label)
                for label in {named.inter_sft, named.full_sft, *(job[-1] for job in jobs)}}
    rows = []
    for variant, kind, setting, claim, source, plan, label in jobs:
        share = recovery.recovery(episodes, named.inter_sft, named.full_sft, label, rule="ood")
        for _, r in table[table["label"] == label].iterrows():
            rows.append({"variant": variant.name, "source": variant.source, "source_label": source.label,
                         "keep": variant.keep, "kind": kind, "setting": setting, "claim_point": claim,
                         "label": label, "rule": r["rule"], "success_rate": r["success_rate"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "episodes": r["episodes"],
                         **({key: share[key] for key in ("share_recovered", "share_ci_low", "share_ci_high",
                                                         "share_defined_in")}
                            if r["rule"] == "ood" else {})})
    out = pd.DataFrame(rows)
    artifacts.write_table(out, artifacts.variants_table(cfg))
    return out


def run_causal(cfg: Config, named: evaluate.Named, force: bool = False) -> pd.DataFrame:
    """The causal test: the RL model, and the RL model with the full-SFT model's directions imposed by each
    of restore.causal_plans, evaluated; one row per (variant, rule) with its success and interval, the RL
    model first. The imposed checkpoints' table is runs/<preset>/eval/causal_results.parquet."""
    if not named.rl:
        raise FileNotFoundError("no RL checkpoint: run 03_ppo (and 04_eval) first")
    by_label = evaluate.checkpoints_by_label(cfg)
    rl, full = by_label[named.rl], by_label[named.full_sft]
    imposed = {}
    for name, plan in restore.causal_plans(cfg).items():
        label = f"causal-{rl.label}-with-{full.label}-directions" + ("" if plan.top is None else f"-top-{plan.top:04d}")
        imposed[name] = restore.restored_checkpoint(cfg, label, rl, full, plan, force)
    causal = evaluate.sweep(cfg, force=force, checkpoints=list(imposed.values()), table_name=artifacts.CAUSAL_RESULTS)
    table, _ = evaluate.load_results(cfg)
    rows = [table[table["label"] == rl.label].assign(variant=f"RL ({rl.label})")]
    for name, checkpoint in imposed.items():
        whole = f": {full.label}'s weights" if restore.replaced_whole(checkpoint.path) else ""
        rows.append(causal[causal["label"] == checkpoint.label].assign(
            variant=f"RL with {full.label}'s directions ({name}){whole}"))
    return pd.concat(rows, ignore_index=True)
