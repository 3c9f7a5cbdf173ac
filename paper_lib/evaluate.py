"""Success rates of checkpoints on the ID and OOD test sets by the multi-turn protocol (PAPER_SPEC 2.5-2.6).

Each checkpoint is evaluated once and cached under runs/<preset>/eval/<label>/ (per-episode records +
manifest), so a sweep after new checkpoints appear evaluates only those; one given with --checkpoint goes
under eval/own/<label>/, with its table in eval/own/<label>.parquet. With several processes
(`accelerate launch -m paper_lib.evaluate --preset P`) each checkpoint's hands are split across them.
The notebooks' sweeps (`sweep`) use eval.num_processes: above 1, the checkpoints not yet evaluated are
dealt out whole to that many processes (`--split checkpoints`), so every checkpoint is played by one
process, with the seeds of a one-process run, whatever the number of GPUs.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

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


def checkpoints_by_label(cfg: Config) -> dict[str, Checkpoint]:
    """discover_checkpoints by evaluation label, as the named checkpoints (Named) refer to them."""
    return {c.label: c for c in discover_checkpoints(cfg)}


def passes(cfg: Config) -> int:
    """Passes over each test hand: eval.repeats when sampling (`model`); greedy decoding says all in one."""
    return cfg.eval.repeats if cfg.eval.decoding == "model" else 1


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


@dataclass(frozen=True)
class OneProcess:
    """The process state of one process that plays whole checkpoints by itself (`--split checkpoints`):
    the launch's device, no split of the hands, nothing to wait for."""

    device: Any
    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, jobs: list) -> Iterator[list]:
        yield jobs


def _play(cfg: Config, checkpoint: Path, hands_by_rule: dict[str, list[cards.Hand]],
          state: PartialState | OneProcess, progress: bool = False) -> list[dict]:
    from transformers import set_seed

    model, tokenizer = models.load(cfg, checkpoint=checkpoint, device=str(state.device))
    model.eval()
    generate = make_generator(cfg, model, tokenizer, progress=progress)
    jobs = [(rule, i, hand) for rule, hands in hands_by_rule.items() for i, hand in enumerate(hands)]
    records = []
    for repeat in range(passes(cfg)):
        # A stream per (pass, process): split_between_processes hands process 0 the ID hands and process 1
        # the OOD hands, and one seed for both would sample ID hand i's answer from OOD hand i's draws. One
        # process keeps eval.seed + pass. Sampled episodes still differ with the process count (greedy's
        # do not); both are draws of the same model, and the manifest records the count.
        set_seed(cfg.eval.seed + repeat * state.num_processes + state.process_index)
        with state.split_between_processes(jobs) as mine:
            records += play_hands(generate, mine, cfg.eval.max_attempts, cfg.data.target, repeat,
                                  cfg.eval.partial_credit)
            if not isinstance(state, OneProcess):  # its launch has reported the checkpoints it deals out
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


def _spec(cfg: Config, checkpoint: Checkpoint, hands: dict[str, list[cards.Hand]]) -> dict:
    return {"stage": "eval", "checkpoint": artifacts.portable_path(checkpoint.path),
            "weights": artifacts.fingerprint(checkpoint.path),
            # what the episodes depend on, no more: a new SFT set or sweep keeps the base model's episodes
            "hands": _hands_key(hands), "target": cfg.data.target, "eval": episode_settings(cfg),
            "code": artifacts.code_hash("evaluate")}


def cached_episodes(cfg: Config, checkpoint: Checkpoint,
                    hands: dict[str, list[cards.Hand]] | None = None) -> pd.DataFrame | None:
    """A checkpoint's cached episodes where they are those evaluate_checkpoint would play now (on `hands`, the
    held-out hands by default) and read back; else None. Read only: nothing is moved or played."""
    out = episodes_dir(cfg, checkpoint)
    if not artifacts.manifest_matches(out, _spec(cfg, checkpoint, held_out_hands(cfg) if hands is None else hands)):
        return None
    try:
        return episodes_table(out)
    except artifacts.ArtifactError:
        return None


def evaluate_checkpoint(cfg: Config, checkpoint: Checkpoint, force: bool = False,
                        state: PartialState | OneProcess | None = None, progress: bool | None = None) -> pd.DataFrame:
    """Per-episode records of one checkpoint on the ID and OOD test sets (cached). Under several processes
    (state: the launch's, by default) each plays a share of the hands; OneProcess plays them all here.
    The progress bar shows on the main process unless `progress` says otherwise."""
    out = episodes_dir(cfg, checkpoint)
    artifacts.validate_checkpoint(checkpoint.path)  # a damaged checkpoint: one line naming the file
    hands = held_out_hands(cfg)
    spec = _spec(cfg, checkpoint, hands)

    redo = f"evaluating {checkpoint.label} again"
    # PartialState() would take a 2-process CPU launch for one process
    state = launch.process_state() if state is None else state
    if state.is_main_process:  # earlier settings' episodes are kept aside, and put back when they return
        artifacts.keep_earlier_result(out, spec, redo, force)
    state.wait_for_everyone()
    cached = artifacts.read_cached(out, spec, episodes_table, redo, force)
    if cached is not None:
        return cached
    log.info("evaluating %s (%s) on %d process(es)", checkpoint.label, checkpoint.path, state.num_processes)
    started = time.time()
    records = _play(cfg, checkpoint.path, hands, state, state.is_main_process if progress is None else progress)
    if state.is_main_process:  # every process played its share of hands; one writes
        with artifacts.atomic_dir(out) as tmp:
            with open(tmp / "episodes.jsonl", "w") as fh:
                for r in sorted(records, key=lambda r: (r["repeat"], r["rule"], r["hand"])):
                    fh.write(json.dumps(r) + "\n")
            artifacts.write_manifest(tmp, spec, seconds=round(time.time() - started, 2), episodes=len(records),
                                     attempts=sum(r["attempts"] for r in records), processes=state.num_processes)
    state.wait_for_everyone()
    return episodes_table(out)


def held_out_hands(cfg: Config) -> dict[str, list[cards.Hand]]:
    """The ID and OOD test hands, by rule (the data built first where needed)."""
    splits = data.load(cfg)
    return {rule: [cards.Hand(tuple(c), rule) for c in splits[split]["cards"]] for rule, split in RULE_SPLITS.items()}


# Settings that pick checkpoints (sft_every) or say where they are played (the processes), not what is played.
NOT_EPISODE_SETTINGS = ("sft_every", "num_processes", "accelerate_config")


def episode_settings(cfg: Config) -> dict:
    """The eval settings that change a checkpoint's episodes."""
    return {k: v for k, v in asdict(cfg.eval).items() if k not in NOT_EPISODE_SETTINGS}


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
    """A checkpoint's cached episodes; ArtifactError where the file holds fewer or more than its manifest
    counted (a file cut at a line's end reads as a valid, shorter table)."""
    table = artifacts.read_table(out / "episodes.jsonl", REEVALUATE)
    counted = ((artifacts.read_manifest(out) or {}).get("provenance") or {}).get("episodes")
    if counted is not None and counted != len(table):
        raise artifacts.ArtifactError(f"{out / 'episodes.jsonl'} holds {len(table)} episodes but its manifest "
                                      f"counted {counted}; {REEVALUATE}")
    return table


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
          table_name: str = artifacts.RESULTS, here: bool = False) -> pd.DataFrame:
    """Evaluate every checkpoint (cached ones are read back) and write runs/<preset>/eval/<table_name>.parquet:
    one row per (checkpoint, rule) with its success rate and Wilson 95% interval. With eval.num_processes > 1
    the checkpoints not yet evaluated are played first in an accelerate launch of that many processes
    (evaluate_in_processes); here=True plays them in this process (or this launch) instead."""
    checkpoints = discover_checkpoints(cfg) if checkpoints is None else checkpoints
    summaries: dict[Checkpoint, list[dict]] = {}  # those read while looking for what to launch: read once
    if not here and cfg.eval.num_processes > 1:
        hands = held_out_hands(cfg)
        for checkpoint in [] if force else checkpoints:
            if (episodes := cached_episodes(cfg, checkpoint, hands)) is not None:
                summaries[checkpoint] = summarize(checkpoint, episodes)
        evaluate_in_processes(cfg, [c for c in checkpoints if c not in summaries], force)
        force = False  # played just now
    rows = []
    for checkpoint in checkpoints:
        rows += summaries.get(checkpoint) or summarize(checkpoint, evaluate_checkpoint(cfg, checkpoint, force=force))
    table = pd.DataFrame(rows)
    artifacts.write_table(table, artifacts.eval_table(cfg, table_name))
    return table


CHECKPOINT_LIST = "evaluate-checkpoints.json"  # under runs/<preset>/logs/: what the last launch was given


def evaluate_in_processes(cfg: Config, checkpoints: list[Checkpoint], force: bool = False) -> None:
    """Play `checkpoints` in `accelerate launch --num_processes <eval.num_processes> -m paper_lib.evaluate
    --split checkpoints` (launch.run_stage, with eval.accelerate_config): each process plays whole
    checkpoints, one after another, on its own device, and caches their episodes as a one-process run would.
    Nothing is launched for an empty list."""
    if not checkpoints:
        return
    held_out_hands(cfg)  # the data is built here, not by several processes at once (sweep has built it)
    listing = launch.stage_log(cfg, "evaluate").parent / CHECKPOINT_LIST
    listing.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_file(listing) as tmp:
        tmp.write_text(json.dumps([{**asdict(c), "path": str(Path(c.path).resolve())} for c in checkpoints], indent=1))
    models.release_gpu_memory()  # each process loads a whole model; this one's cached blocks would crowd GPU 0
    launch.run_stage(cfg, "evaluate", "eval", ["--checkpoints", str(listing), "--split", "checkpoints",
                                               *(["--force"] if force else [])])


def read_checkpoint_list(path: str | Path) -> list[Checkpoint]:
    """The checkpoints of a --checkpoints file: a JSON list of {label, stage, step, path}."""
    try:
        rows = json.loads(Path(path).read_text())
        return [Checkpoint(str(r["label"]), str(r["stage"]), int(r["step"]), Path(r["path"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise artifacts.ArtifactError(f"{path} is not a list of checkpoints ({{label, stage, step, path}}): {err}")


def evaluate_share(cfg: Config, checkpoints: list[Checkpoint], force: bool = False) -> list[Checkpoint]:
    """This process's share of `checkpoints` under the launch (every num_processes-th, from its index),
    each played whole by this process alone (OneProcess); returns the share. No process waits for another."""
    state = launch.process_state()
    mine = checkpoints[state.process_index::state.num_processes]
    launch.report_processes("eval", state, f"{len(mine)} of {len(checkpoints)} checkpoints")
    alone = OneProcess(state.device)
    for checkpoint in mine:
        evaluate_checkpoint(cfg, checkpoint, force=force, state=alone, progress=state.is_main_process)
    return mine


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
    if len(rl):
        _warn_if_rl_started_elsewhere(cfg, full)
    return Named("base", inter_sft(table, up_to=up_to), full, str(rl.iloc[-1]) if len(rl) else None,
                 tuple(_sft_ood(table, up_to)["label"].astype(str)))


def _trained_by_label(cfg: Config) -> dict[str, Checkpoint]:
    """Every SFT and RL checkpoint on disk by label (no base model: finding a hub model may download it)."""
    found = [*_numbered(artifacts.sft_dir(cfg), "sft"), *_numbered(artifacts.rl_dir(cfg), "rl")]
    return {c.label: c for c in found}


def _warn_if_rl_started_elsewhere(cfg: Config, full: str) -> None:
    """A warning where the RL run on disk did not start from the full-SFT checkpoint now on disk (another SFT
    run was moved back after PPO ran): Figure 1 and the recovery would call it RL from this full SFT."""
    started = (artifacts.read_manifest(artifacts.rl_dir(cfg)) or {}).get("init_weights")
    checkpoint = _trained_by_label(cfg).get(full)
    if started and checkpoint and started != artifacts.fingerprint(checkpoint.path):
        log.warning("the RL run in %s did not start from full SFT %s as it is now on disk (%s); rerun "
                    "notebooks/03_ppo.py, then 04_eval, to compare RL with this SFT run", artifacts.rl_dir(cfg),
                    full, checkpoint.path)


REFERENCE_NAMES = {"base": "base", "Inter_SFT": "inter_sft", "full SFT": "full_sft"}  # name -> Named field


def reference_rates(table: pd.DataFrame, named: Named, names: tuple[str, ...] = tuple(REFERENCE_NAMES)) -> pd.DataFrame:
    """The rows of the named checkpoints (base, Inter_SFT, full SFT) in a success table, with a `name`
    column: the reference levels Figures 5-7 draw."""
    return pd.concat([table[table["label"] == getattr(named, REFERENCE_NAMES[name])].assign(name=name)
                      for name in names])


def load_results(cfg: Config) -> tuple[pd.DataFrame, Named]:
    """04_eval's success table (runs/<preset>/eval/results.parquet) and the named checkpoints chosen from it,
    as the later notebooks and paper_lib.claims read them."""
    path = artifacts.eval_table(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run notebooks 01-04 for preset {cfg.preset!r} first")
    table = artifacts.read_table(path, f"rerun notebooks/04_eval.py (./run_all.sh {cfg.preset} --only 4), "
                                       f"which writes it again from its cached episodes")
    named = named_checkpoints(cfg, table)
    check_results_fit(cfg, named)
    return table, named


def check_results_fit(cfg: Config, named: Named) -> None:
    """ArtifactError where 04_eval's episodes of a named checkpoint were played on other hands, under other
    eval settings or by other weights than cfg and the checkpoints now on disk give: 04 run with overrides
    that 05-08 do not share, or an SFT run moved back after 04. The later notebooks would otherwise set
    those episodes beside ones played under their own settings (a restore's share, the causal change)."""
    now = {"hands": _hands_key(held_out_hands(cfg)), "target": cfg.data.target, "eval": episode_settings(cfg)}
    on_disk = _trained_by_label(cfg)
    fix = f"rerun notebooks/04_eval.py with this notebook's settings (./run_all.sh {cfg.preset} --from 4)"
    for label in dict.fromkeys(x for x in (named.inter_sft, named.full_sft, named.rl, *named.inter_candidates) if x):
        record = artifacts.read_manifest(artifacts.eval_dir(cfg) / label)
        if record is None:  # no record to compare (a table a user wrote): nothing to say
            continue
        if label not in on_disk:
            raise artifacts.ArtifactError(f"04_eval's results name {label}, which is no longer on disk; {fix}")
        wanted = json.loads(json.dumps({**now, "weights": artifacts.fingerprint(on_disk[label].path)}))  # as stored
        played = {key: record.get(key) for key in wanted}
        if played != wanted:
            raise artifacts.ArtifactError(f"04_eval's episodes of {label} were played otherwise than this notebook "
                                          f"would ({artifacts.spec_changes(played, wanted)}); {fix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="preset name or a .yaml path")
    parser.add_argument("--checkpoint", help="evaluate this HF checkpoint directory only")
    parser.add_argument("--label", help="label for --checkpoint (default: its directory name)")
    parser.add_argument("--checkpoints", metavar="FILE",
                        help="evaluate the checkpoints of this JSON list of {label, stage, step, path} (what a "
                             "notebook's sweep passes) and write no table")
    parser.add_argument("--split", choices=("hands", "checkpoints"), default="hands",
                        help="under several processes: split each checkpoint's hands (default), or deal out "
                             "whole checkpoints (with --checkpoints), each played as by one process")
    parser.add_argument("--override", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings, e.g. --override eval.max_attempts=3")
    parser.add_argument("--force", action="store_true", help="re-evaluate even when cached")
    args = parser.parse_args(argv)
    if args.label is not None and not args.checkpoint:
        parser.error("--label names a --checkpoint; pass both")
    if args.checkpoint and args.checkpoints:
        parser.error("--checkpoint and --checkpoints: pass one")
    if args.split == "checkpoints" and not args.checkpoints:
        parser.error("--split checkpoints deals out the checkpoints of --checkpoints FILE; pass it")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    def work() -> str:
        cfg = launch.stage_config(args)
        if args.checkpoints:
            listed = read_checkpoint_list(args.checkpoints)
            if args.split == "checkpoints":
                mine = evaluate_share(cfg, listed, force=args.force)
                return f"evaluated {len(listed)} checkpoint(s) on the launch's processes (this one: {len(mine)})"
            for checkpoint in listed:
                evaluate_checkpoint(cfg, checkpoint, force=args.force)
            return f"evaluated {len(listed)} checkpoint(s); episodes under {artifacts.eval_dir(cfg)}"
        chosen = None
        if args.checkpoint:
            path = Path(args.checkpoint)
            # a label names a directory under runs/<preset>/eval/: one safe name, never a path; "." gives
            # the directory's real name
            label = artifacts.safe_name(args.label if args.label is not None else path.resolve().name)
            chosen = [Checkpoint(label, OWN_STAGE, 0, path)]
        # one checkpoint's table goes beside its episodes (eval/own/), never over the pipeline's results
        name = f"{OWN_DIR}/{chosen[0].label}" if chosen else artifacts.RESULTS
        table = sweep(cfg, force=args.force, checkpoints=chosen, table_name=name, here=True)
        return (table[["label", "rule", "success_rate", "ci_low", "ci_high"]].to_string(index=False)
                + f"\nwritten to {artifacts.eval_table(cfg, name)}, episodes under "
                  f"{episodes_dir(cfg, chosen[0]) if chosen else artifacts.eval_dir(cfg)}")

    return launch.run_main(work)


if __name__ == "__main__":
    sys.exit(main())
