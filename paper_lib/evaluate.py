"""Success rates of checkpoints on the ID and OOD test sets by the multi-turn protocol (PAPER_SPEC 2.5-2.6).

Each checkpoint is evaluated once and cached under runs/<preset>/eval/<label>/ (per-episode records +
manifest), so a sweep after new checkpoints appear evaluates only those. With several processes
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate import PartialState
from accelerate.utils import gather_object

from . import artifacts, cards, config, data, launch, models
from .config import Config

log = logging.getLogger(__name__)
RULE_SPLITS = {"id": "id_test", "ood": "ood_test"}


@dataclass(frozen=True)
class Checkpoint:
    label: str  # "base", "sft-0120", "rl-0003", or a user's label
    stage: str  # base, sft, rl or other
    step: int
    path: Path


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact endpoints where the rounding of centre - half would leave a 1e-16 gap
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def fingerprint(checkpoint: str | Path) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and mtimes of its weight files."""
    path = Path(checkpoint)
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {path}")
    blob = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _numbered(directory: Path, stage: str) -> list[Checkpoint]:
    return [Checkpoint(f"{stage}-{step:04d}", stage, step, path)
            for step, path in artifacts.numbered_checkpoints(directory).items()]


def discover_checkpoints(cfg: Config) -> list[Checkpoint]:
    """The base model, then every SFT checkpoint, then every RL checkpoint that exists."""
    base = Checkpoint("base", "base", 0, Path(models.base_model_path(cfg)))
    return [base, *_numbered(artifacts.sft_dir(cfg), "sft"), *_numbered(artifacts.rl_dir(cfg), "rl")]


def play_hands(generate: cards.Generate, jobs: list[tuple[str, int, cards.Hand]], max_attempts: int,
               target: int = cards.TARGET) -> list[dict]:
    """Play (rule, index, hand) jobs with `generate`; one record per episode."""
    episodes = cards.run_episodes(generate, [hand for _, _, hand in jobs], max_attempts, target)
    return [_record(rule, i, e) for (rule, i, _), e in zip(jobs, episodes)]


def _play(cfg: Config, checkpoint: Path, hands_by_rule: dict[str, list[cards.Hand]],
          state: PartialState) -> list[dict]:
    from .rollout import Generator

    model, tokenizer = models.load(cfg, checkpoint=checkpoint, device=str(state.device))
    model.eval()
    generate = Generator(model, tokenizer, cfg.eval.max_new_tokens, cfg.eval.temperature, cfg.eval.batch_size,
                         progress=state.is_main_process)
    jobs = [(rule, i, hand) for rule, hands in hands_by_rule.items() for i, hand in enumerate(hands)]
    with state.split_between_processes(jobs) as mine:
        records = play_hands(generate, mine, cfg.eval.max_attempts, cfg.data.target)
        launch.report_processes("eval", state, f"{len(mine)} of {len(jobs)} hands")
    return gather_object(records) if state.num_processes > 1 else records


def _record(rule: str, index: int, episode: cards.Episode) -> dict:
    return {
        "rule": rule, "hand": index, "cards": list(episode.hand.cards), "numbers": list(episode.hand.numbers),
        "success": episode.success, "attempts": len(episode.attempts),
        "first_status": episode.attempts[0].verdict.status if episode.attempts else None,
        "transcript": [{"text": a.text, "formula": a.formula, "status": a.verdict.status,
                        "reward": a.verdict.reward, "message": a.verdict.message} for a in episode.attempts],
    }


def evaluate_checkpoint(cfg: Config, checkpoint: Checkpoint, force: bool = False) -> pd.DataFrame:
    """Per-episode records of one checkpoint on the ID and OOD test sets (cached)."""
    out = artifacts.eval_dir(cfg) / checkpoint.label
    spec = {"stage": "eval", "checkpoint": str(checkpoint.path), "weights": fingerprint(checkpoint.path),
            "eval": asdict(cfg.eval), "data": asdict(cfg.data),
            "code": artifacts.code_hash("cards", "rollout", "evaluate")}

    if not force and artifacts.manifest_matches(out, spec):
        return episodes_table(out)
    state = launch.process_state()  # PartialState() would take a 2-process CPU launch for one process
    splits = data.load(cfg)
    hands = {rule: [cards.Hand(tuple(c), rule) for c in splits[split]["cards"]] for rule, split in RULE_SPLITS.items()}
    log.info("evaluating %s (%s) on %d process(es)", checkpoint.label, checkpoint.path, state.num_processes)
    records = _play(cfg, checkpoint.path, hands, state)
    if state.is_main_process:  # every process played its share of hands; one writes
        with artifacts.atomic_dir(out) as tmp:
            with open(tmp / "episodes.jsonl", "w") as fh:
                for r in sorted(records, key=lambda r: (r["rule"], r["hand"])):
                    fh.write(json.dumps(r) + "\n")
            artifacts.write_manifest(tmp, spec)
    state.wait_for_everyone()
    return episodes_table(out)


def episodes_table(out: Path) -> pd.DataFrame:
    return pd.read_json(out / "episodes.jsonl", lines=True)


def summarize(checkpoint: Checkpoint, episodes: pd.DataFrame) -> list[dict]:
    """One row per rule: successes, success rate with its Wilson 95% interval, mean attempts."""
    rows = []
    for rule, group in episodes.groupby("rule"):
        k, n = int(group["success"].sum()), len(group)
        lo, hi = wilson_interval(k, n)
        rows.append({"label": checkpoint.label, "stage": checkpoint.stage, "step": checkpoint.step, "rule": rule,
                     "successes": k, "episodes": n, "success_rate": k / n, "ci_low": lo, "ci_high": hi,
                     "mean_attempts": float(group["attempts"].mean())})
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
    table.to_parquet(artifacts.eval_dir(cfg) / f"{table_name}.parquet", index=False)
    return table


def load_episodes(cfg: Config, label: str) -> pd.DataFrame:
    """Per-episode records of an evaluated checkpoint."""
    return episodes_table(artifacts.eval_dir(cfg) / label)


def inter_sft(table: pd.DataFrame) -> str:
    """Label of the Inter_SFT checkpoint: the SFT checkpoint with the best OOD success (earliest on ties)."""
    sft = table[(table["stage"] == "sft") & (table["rule"] == "ood")].sort_values("step")
    if sft.empty:
        raise ValueError("no SFT checkpoint has been evaluated yet; run 02_sft and 04_eval first")
    return str(sft.loc[sft["success_rate"].idxmax(), "label"])


def full_sft(cfg: Config, table: pd.DataFrame) -> str:
    """Label of the full-SFT checkpoint (the one RL starts from): the one at sft.full_sft_step if it
    exists, else the last SFT checkpoint."""
    steps = sorted(set(table.loc[table["stage"] == "sft", "step"]))
    if not steps:
        raise ValueError("no SFT checkpoint has been evaluated yet; run 02_sft and 04_eval first")
    step = cfg.sft.full_sft_step if cfg.sft.full_sft_step in steps else steps[-1]
    return f"sft-{step:04d}"


def recovery(episodes: dict[str, pd.DataFrame], inter: str, full: str, rl: str | None, rule: str = "ood",
             n_boot: int = 2000, seed: int = 0) -> dict:
    """The paper's quantities on one rule: the drop from Inter_SFT to full SFT and the share of it that
    RL recovers, (rl - full) / (inter - full), with 95% intervals from a paired bootstrap over hands."""
    def hits(label):
        e = episodes[label]
        return e[e["rule"] == rule].sort_values("hand")["success"].to_numpy(dtype=float)

    a, b = hits(inter), hits(full)
    c = hits(rl) if rl else None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    drop = a.mean() - b.mean()
    boot_drop = a[idx].mean(1) - b[idx].mean(1)
    result = {"rule": rule, "inter_sft": inter, "full_sft": full, "rl": rl,
              "inter_rate": a.mean(), "full_rate": b.mean(), "drop": drop,
              "drop_ci": tuple(np.percentile(boot_drop, [2.5, 97.5]))}
    if c is not None:
        gain, boot_gain = c.mean() - b.mean(), c[idx].mean(1) - b[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_share = np.where(boot_drop > 0, boot_gain / boot_drop, np.nan)
        result.update(rl_rate=c.mean(), gain=gain,
                      share_recovered=gain / drop if drop > 0 else float("nan"),
                      share_ci=tuple(np.nanpercentile(boot_share, [2.5, 97.5])) if np.isfinite(boot_share).any()
                      else (float("nan"), float("nan")),
                      share_defined_in=float(np.isfinite(boot_share).mean()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="preset name or a .yaml path")
    parser.add_argument("--checkpoint", help="evaluate this HF checkpoint directory only")
    parser.add_argument("--label", help="label for --checkpoint (default: its directory name)")
    parser.add_argument("--force", action="store_true", help="re-evaluate even when cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.preset)
        chosen = None
        if args.checkpoint:
            path = Path(args.checkpoint)
            chosen = [Checkpoint(args.label or path.name, "other", 0, path)]
        table = sweep(cfg, force=args.force, checkpoints=chosen)
    except (config.ConfigError, FileNotFoundError, models.ModelUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table[["label", "rule", "success_rate", "ci_low", "ci_high"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
