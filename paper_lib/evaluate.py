"""Success rates of checkpoints on the ID and OOD test sets by the multi-turn protocol (PAPER_SPEC 2.5-2.6).

Each checkpoint is evaluated once and cached under runs/<preset>/eval/<label>/ (per-episode records +
manifest), so a sweep after new checkpoints appear evaluates only those; one given with --checkpoint goes
under eval/own/<label>/, with its table in eval/own/<label>.parquet. With several processes
(`accelerate launch -m paper_lib.evaluate --preset P`) the hands are split across them.

    python -m paper_lib.evaluate --preset tiny                 # sweep base, SFT and RL checkpoints
    python -m paper_lib.evaluate --preset tiny --checkpoint DIR --label mine
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate import PartialState
from accelerate.utils import gather_object

from . import artifacts, cards, config, data, launch, models
from .artifacts import Checkpoint
from .config import Config

log = logging.getLogger(__name__)
RULE_SPLITS = {"id": "id_test", "ood": "ood_test"}
OWN_STAGE = "other"  # a checkpoint given on the command line, not one the pipeline made
OWN_DIR = "own"  # under eval/: its episodes and table, apart from every pipeline result


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) for n = 0. successes
    may be fractional (a sum of per-hand rates over repeated passes: summarize)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact endpoints where the rounding of centre - half would leave a 1e-16 gap
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def _numbered(directory: Path, stage: str) -> list[Checkpoint]:
    return [Checkpoint(f"{stage}-{step:04d}", stage, step, path)
            for step, path in artifacts.numbered_checkpoints(directory).items()]


def discover_checkpoints(cfg: Config) -> list[Checkpoint]:
    """The base model, then the SFT checkpoints that eval.sft_every selects, then every RL checkpoint."""
    base = Checkpoint("base", "base", 0, Path(models.base_model_path(cfg)))
    return [base, *select_sft(cfg, _numbered(artifacts.sft_dir(cfg), "sft")), *_numbered(artifacts.rl_dir(cfg), "rl")]


def select_sft(cfg: Config, found: list[Checkpoint]) -> list[Checkpoint]:
    """The found SFT checkpoints that artifacts.evaluated_sft_steps selects (eval.sft_every)."""
    keep = set(artifacts.evaluated_sft_steps(cfg, [c.step for c in found]))
    return [c for c in found if c.step in keep]


def play_hands(generate: cards.Generate, jobs: list[tuple[str, int, cards.Hand]], max_attempts: int,
               target: int = cards.TARGET, repeat: int = 0, partial_credit: str = "arithmetic") -> list[dict]:
    """Play (rule, index, hand) jobs with `generate`; one record per episode."""
    episodes = cards.run_episodes(generate, [hand for _, _, hand in jobs], max_attempts, target, partial_credit)
    return [_record(rule, i, e, repeat) for (rule, i, _), e in zip(jobs, episodes)]


def make_generator(cfg: Config, model, tokenizer, progress: bool = False):
    """The evaluation's decoding (eval.decoding): greedy, or sampling with the checkpoint's own
    generation_config as upstream's evaluator did; repetition_penalty always from eval.repetition_penalty."""
    from .rollout import Generator, model_sampling

    sampling = model_sampling(model) if cfg.eval.decoding == "model" else None
    return Generator(model, tokenizer, cfg.eval.max_new_tokens, 0.0, cfg.eval.batch_size, progress=progress,
                     repetition_penalty=cfg.eval.repetition_penalty, sampling=sampling)


def _play(cfg: Config, checkpoint: Path, hands_by_rule: dict[str, list[cards.Hand]],
          state: PartialState) -> list[dict]:
    from transformers import set_seed

    model, tokenizer = models.load(cfg, checkpoint=checkpoint, device=str(state.device))
    model.eval()
    generate = make_generator(cfg, model, tokenizer, progress=state.is_main_process)
    jobs = [(rule, i, hand) for rule, hands in hands_by_rule.items() for i, hand in enumerate(hands)]
    records = []
    for repeat in range(cfg.eval.repeats if cfg.eval.decoding == "model" else 1):  # greedy: one pass says all
        set_seed(cfg.eval.seed + repeat)
        with state.split_between_processes(jobs) as mine:
            records += play_hands(generate, mine, cfg.eval.max_attempts, cfg.data.target, repeat,
                                  cfg.eval.partial_credit)
            launch.report_processes("eval", state, f"{len(mine)} of {len(jobs)} hands")
    return gather_object(records) if state.num_processes > 1 else records


def _record(rule: str, index: int, episode: cards.Episode, repeat: int = 0) -> dict:
    return {
        "rule": rule, "hand": index, "repeat": repeat, "cards": list(episode.hand.cards),
        "numbers": list(episode.hand.numbers),
        "success": episode.success, "attempts": len(episode.attempts),
        "first_status": episode.attempts[0].verdict.status if episode.attempts else None,
        "transcript": [{"text": a.text, "formula": a.formula, "status": a.verdict.status,
                        "reward": a.verdict.reward, "message": a.verdict.message} for a in episode.attempts],
    }


def evaluate_checkpoint(cfg: Config, checkpoint: Checkpoint, force: bool = False) -> pd.DataFrame:
    """Per-episode records of one checkpoint on the ID and OOD test sets (cached)."""
    out = episodes_dir(cfg, checkpoint)
    artifacts.validate_checkpoint(checkpoint.path)  # a damaged checkpoint: one line naming the file
    splits = data.load(cfg)  # built first where needed
    hands = {rule: [cards.Hand(tuple(c), rule) for c in splits[split]["cards"]] for rule, split in RULE_SPLITS.items()}
    spec = {"stage": "eval", "checkpoint": artifacts.portable_path(checkpoint.path),
            "weights": artifacts.fingerprint(checkpoint.path),
            # what the episodes depend on, no more: a new SFT set or sweep keeps the base model's episodes
            "hands": _hands_key(hands), "target": cfg.data.target, "eval": episode_settings(cfg),
            "code": artifacts.code_hash("evaluate")}

    redo = f"evaluating {checkpoint.label} again"
    state = launch.process_state()  # PartialState() would take a 2-process CPU launch for one process
    if state.is_main_process:  # earlier settings' episodes are kept aside, and put back when they return
        artifacts.keep_earlier_result(out, spec, redo, force)
    state.wait_for_everyone()
    cached = artifacts.read_cached(out, spec, episodes_table, redo, force)
    if cached is not None:
        return cached
    log.info("evaluating %s (%s) on %d process(es)", checkpoint.label, checkpoint.path, state.num_processes)
    started = time.time()
    records = _play(cfg, checkpoint.path, hands, state)
    if state.is_main_process:  # every process played its share of hands; one writes
        with artifacts.atomic_dir(out) as tmp:
            with open(tmp / "episodes.jsonl", "w") as fh:
                for r in sorted(records, key=lambda r: (r["repeat"], r["rule"], r["hand"])):
                    fh.write(json.dumps(r) + "\n")
            artifacts.write_manifest(tmp, spec, seconds=round(time.time() - started, 2), episodes=len(records),
                                     attempts=sum(r["attempts"] for r in records))
    state.wait_for_everyone()
    return episodes_table(out)


def episode_settings(cfg: Config) -> dict:
    """The eval settings that change a checkpoint's episodes; eval.sft_every only picks checkpoints."""
    return {k: v for k, v in asdict(cfg.eval).items() if k != "sft_every"}


def _hands_key(hands: dict[str, list[cards.Hand]]) -> str:
    text = json.dumps({rule: [list(h.cards) for h in group] for rule, group in sorted(hands.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def episodes_dir(cfg: Config, checkpoint: Checkpoint) -> Path:
    """Where a checkpoint's episodes are cached: eval/<label> for the pipeline's own, eval/own/<label> for
    one evaluated from the command line (stage "other"), so that no label a user picks can replace a
    result the notebooks read."""
    own = (OWN_DIR,) if checkpoint.stage == OWN_STAGE else ()
    return artifacts.eval_dir(cfg).joinpath(*own, artifacts.safe_name(checkpoint.label))


REEVALUATE = ("rerun the notebook that evaluated it (04_eval, 06_restore or 07_causal): a cache that cannot be "
              "read is evaluated again")


def episodes_table(out: Path) -> pd.DataFrame:
    return artifacts.read_table(out / "episodes.jsonl", REEVALUATE)


def summarize(checkpoint: Checkpoint, episodes: pd.DataFrame) -> list[dict]:
    """One row per rule: successes, success rate with its Wilson 95% interval, mean attempts, and under
    sampled decoding the spread of the success rate over the repeated passes (min, max, std).

    The interval counts hands, not episodes: repeated passes replay the same hands, so n is the number of
    hands and k their summed per-hand success rate (a mean of per-hand rates in [0, 1] varies no more
    than a binomial rate over as many hands, so the interval stays valid)."""
    rows = []
    if "repeat" not in episodes:
        episodes = episodes.assign(repeat=0)
    for rule, group in episodes.groupby("rule"):
        k, n = int(group["success"].sum()), len(group)
        per_hand = group.groupby("hand")["success"].mean() if "hand" in group else group["success"]
        lo, hi = wilson_interval(float(per_hand.sum()), len(per_hand))
        per_pass = group.groupby("repeat")["success"].mean()
        rows.append({"label": checkpoint.label, "stage": checkpoint.stage, "step": checkpoint.step, "rule": rule,
                     "successes": k, "episodes": n, "success_rate": k / n, "ci_low": lo, "ci_high": hi,
                     "mean_attempts": float(group["attempts"].mean()), "repeats": len(per_pass),
                     "repeat_min": float(per_pass.min()), "repeat_max": float(per_pass.max()),
                     "repeat_std": float(per_pass.std(ddof=0))})
    return rows


def sweep(cfg: Config, force: bool = False, checkpoints: list[Checkpoint] | None = None,
          table_name: str = "results") -> pd.DataFrame:
    """Evaluate every checkpoint (cached ones are read back) and write runs/<preset>/eval/<table_name>.parquet:
    one row per (checkpoint, rule) with its success rate and Wilson 95% interval."""
    checkpoints = discover_checkpoints(cfg) if checkpoints is None else checkpoints
    rows = []
    for checkpoint in checkpoints:
        rows += summarize(checkpoint, evaluate_checkpoint(cfg, checkpoint, force=force))
    table = pd.DataFrame(rows)
    artifacts.write_table(table, artifacts.eval_dir(cfg) / f"{table_name}.parquet")
    return table


INTER_SFT_RULE = ("Inter_SFT is the SFT checkpoint with the best OOD success among the steps up to full SFT "
                  "(earliest on ties); full SFT is sft.full_sft_step, or the last SFT checkpoint if that step "
                  "was not saved.")


def inter_sft(table: pd.DataFrame, up_to: int | None = None) -> str:
    """Label of the Inter_SFT checkpoint: the SFT checkpoint with the best OOD success among steps <= up_to
    (the full-SFT step; all steps when None), earliest on ties. A later checkpoint that wins by noise would
    make the drop negative and the recovered share meaningless."""
    sft = _sft_ood(table, up_to)
    if sft.empty:
        raise ValueError("no SFT checkpoint has been evaluated yet; run 02_sft and 04_eval first")
    return str(sft.loc[sft["success_rate"].idxmax(), "label"])


def _sft_ood(table: pd.DataFrame, up_to: int | None) -> pd.DataFrame:
    """The OOD rows of the SFT checkpoints at steps <= up_to (all when None), by step: Inter_SFT's candidates."""
    sft = table[(table["stage"] == "sft") & (table["rule"] == "ood")]
    if up_to is not None:
        sft = sft[sft["step"] <= up_to]
    return sft.sort_values("step", kind="stable")


def full_sft(cfg: Config, table: pd.DataFrame) -> str:
    """Label of the full-SFT checkpoint (the one RL starts from): artifacts.full_sft_step's rule."""
    steps = set(table.loc[table["stage"] == "sft", "step"])
    if not steps:
        raise ValueError("no SFT checkpoint has been evaluated yet; run 02_sft and 04_eval first")
    return f"sft-{artifacts.full_sft_step(cfg, steps):04d}"


@dataclass(frozen=True)
class Named:
    """The paper's named checkpoints, as evaluation labels: base, Inter_SFT, full SFT and RL (the last RL
    checkpoint; None before RL has run)."""

    base: str
    inter_sft: str
    full_sft: str
    rl: str | None
    # the SFT checkpoints Inter_SFT was picked among, on the same OOD hands: recovery's drop interval allows for it
    inter_candidates: tuple[str, ...] = ()


def named_checkpoints(cfg: Config, table: pd.DataFrame) -> Named:
    """Base, Inter_SFT, full SFT and RL, each chosen by one rule (INTER_SFT_RULE), for every notebook."""
    full = full_sft(cfg, table)
    up_to = int(table.loc[table["label"] == full, "step"].iloc[0])
    rl = table.loc[table["stage"] == "rl"].sort_values("step")["label"]
    return Named("base", inter_sft(table, up_to=up_to), full, str(rl.iloc[-1]) if len(rl) else None,
                 tuple(_sft_ood(table, up_to)["label"].astype(str)))


REFERENCE_NAMES = {"base": "base", "Inter_SFT": "inter_sft", "full SFT": "full_sft"}  # name -> Named field


def reference_rates(table: pd.DataFrame, named: Named, names: tuple[str, ...] = tuple(REFERENCE_NAMES)) -> pd.DataFrame:
    """The rows of the named checkpoints (base, Inter_SFT, full SFT) in a success table, with a `name`
    column: the reference levels Figures 5-7 draw."""
    return pd.concat([table[table["label"] == getattr(named, REFERENCE_NAMES[name])].assign(name=name)
                      for name in names])


def load_results(cfg: Config) -> tuple[pd.DataFrame, Named]:
    """04_eval's success table (runs/<preset>/eval/results.parquet) and the named checkpoints chosen from it,
    as the later notebooks and paper_lib.claims read them."""
    path = artifacts.eval_dir(cfg) / "results.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run notebooks 01-04 for preset {cfg.preset!r} first")
    table = artifacts.read_table(path, f"rerun notebooks/04_eval.py (./run_all.sh {cfg.preset} --only 4), "
                                       f"which writes it again from its cached episodes")
    return table, named_checkpoints(cfg, table)


def hand_hits(episodes: pd.DataFrame, rule: str) -> np.ndarray:
    """Success per test hand of one rule, sorted by hand, averaged over repeated passes (0/1 under greedy
    decoding): the unit that paired bootstraps resample."""
    e = episodes[episodes["rule"] == rule]
    return e.groupby("hand")["success"].mean().sort_index().to_numpy(dtype=float)


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


def recovery(episodes: dict[str, pd.DataFrame], inter: str, full: str, rl: str | None, rule: str = "ood",
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
    a, b = hand_hits(episodes[inter], rule), hand_hits(episodes[full], rule)
    c = hand_hits(episodes[rl], rule) if rl else None
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
    pool = [label for label in dict.fromkeys(selected_from) if label != full] if rule == "ood" else []
    result["inter_candidates"] = len(pool) if inter in pool else 1
    if inter in pool and len(pool) > 1:
        hits = [hand_hits(episodes[label], rule) for label in pool]
        rates, boot_rates = np.array([h.mean() for h in hits]), np.stack([h[idx].mean(1) for h in hits])
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


def headline(cfg: Config, named: Named) -> pd.DataFrame:
    """The paper's headline quantities per rule (OOD first): Inter_SFT, full SFT and RL success, the drop
    and the relative drop (Inter_SFT - full SFT) / Inter_SFT, and RL's share of the drop recovered, with
    paired-bootstrap intervals (the OOD drop's allowing for Inter_SFT's pick). Written to
    runs/<preset>/eval/recovery.csv."""
    labels = {named.inter_sft, named.full_sft, named.rl, *named.inter_candidates} - {None}
    episodes = {label: episodes_table(artifacts.eval_dir(cfg) / label) for label in labels}
    table = pd.DataFrame([recovery(episodes, named.inter_sft, named.full_sft, named.rl, rule=rule,
                                   selected_from=named.inter_candidates)
                          for rule in ("ood", "id")]).set_index("rule")
    artifacts.write_table(table, artifacts.eval_dir(cfg) / "recovery.csv", index=True)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="preset name or a .yaml path")
    parser.add_argument("--checkpoint", help="evaluate this HF checkpoint directory only")
    parser.add_argument("--label", help="label for --checkpoint (default: its directory name)")
    parser.add_argument("--force", action="store_true", help="re-evaluate even when cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    def work() -> str:
        cfg = config.load(args.preset)
        chosen = None
        if args.checkpoint:
            path = Path(args.checkpoint)
            # a label names a directory under runs/<preset>/eval/: one safe name, never a path; "." gives
            # the directory's real name
            label = artifacts.safe_name(args.label if args.label is not None else path.resolve().name)
            chosen = [Checkpoint(label, OWN_STAGE, 0, path)]
        # one checkpoint's table goes beside its episodes (eval/own/), never over the pipeline's results
        table = sweep(cfg, force=args.force, checkpoints=chosen,
                      table_name=f"{OWN_DIR}/{chosen[0].label}" if chosen else "results")
        return table[["label", "rule", "success_rate", "ci_low", "ci_high"]].to_string(index=False)

    return launch.run_main(work)


if __name__ == "__main__":
    sys.exit(main())
