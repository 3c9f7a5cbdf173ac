"""PPO throughput: rollout tokens/s and seconds per update, from a short run of paper_lib.ppo.

    python benchmarks/bench_ppo.py --preset tiny [--updates 4] [--checkpoint DIR] [--write-docs]

Starts from DIR, else the preset's full-SFT checkpoint if 02_sft has made one, else its base model, and
writes the run to a temporary directory (runs/<preset>/rl is left alone). Prints a markdown row: the
mean over updates after the first (which warms up) of rollout tokens/s (generated tokens over the time
spent generating), rollout and optimisation seconds per update (optimisation = scoring the rollouts,
the PPO epochs and the KL probe), and the load average, since other processes skew CPU timings.
--write-docs puts the result, with its command, machine and date, in its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import pandas as pd
import torch
from _common import cpu_name, write_section

from paper_lib import config, models, ppo



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--checkpoint", help="start from this HF checkpoint")
    p.add_argument("--write-docs", action="store_true", help="write the result into docs/benchmarks.md")
    args = p.parse_args()

    cfg = config.load(args.preset, rl__num_updates=args.updates, rl__save_every=args.updates)
    if args.checkpoint:
        init, label = args.checkpoint, args.checkpoint
    else:
        try:
            init, label = ppo.init_checkpoint(cfg), "full SFT"
        except FileNotFoundError:
            init, label = models.base_model_path(cfg), "base"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PAPER_RUNS_DIR"] = tmp  # the run's checkpoints go here, not to runs/<preset>/rl
        start = time.perf_counter()
        out = ppo.train(cfg, init=init, force=True, progress=False)
        wall = time.perf_counter() - start
        m = pd.read_csv(out / "metrics.csv")
    steady = m[m["update"] > 1] if len(m) > 1 else m
    optimise = steady["seconds"] - steady["rollout_seconds"]
    load = max(load_before, os.getloadavg()[0])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, {cpu_name()}), {int(m['torch_threads'].iloc[-1])} torch thread(s)"
    table = "\n".join([
        "| preset | start | attempts/update | updates | rollout tokens/s | rollout s/update | optimisation s/update "
        "| s/update | wall (s, incl. load + save) | load avg | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {cfg.preset} | {label} | {cfg.rl.steps_per_update} x {cfg.rl.num_processes} proc | {len(m)} | "
        f"{steady['rollout_tokens_per_s'].mean():.0f} | {steady['rollout_seconds'].mean():.2f} | {optimise.mean():.2f} | "
        f"{steady['seconds'].mean():.2f} | {wall:.1f} | {load:.1f} | {device} |"])
    print(table)
    if args.write_docs:
        write_docs(table, load, " ".join(["python", "benchmarks/bench_ppo.py", *sys.argv[1:]]), cfg)


def write_docs(table: str, load: float, command: str, cfg) -> None:
    """Replace this script's section of docs/benchmarks.md (or append it), leaving the others alone."""
    busy = load > 0.5 * (os.cpu_count() or 1)
    section = "\n".join([ f"## PPO throughput on CPU ({cfg.preset} preset)", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}; nproc {os.cpu_count()}, {cpu_name()}, {platform.system()}; "
        f"torch {torch.__version__}.", "",
        f"A {cfg.rl.num_updates}-update run of `paper_lib.ppo.train` ({cfg.rl.steps_per_update} attempts per update, "
        f"max_new_tokens {cfg.rl.max_new_tokens}, {cfg.rl.ppo_epochs} PPO epochs, multi-turn episodes of up to "
        f"{cfg.eval.max_attempts} attempts). Means over the updates after the first. Rollout tokens/s counts generated "
        f"tokens over the time spent generating; optimisation is the rest of an update (scoring the rollouts, the PPO "
        f"epochs, the KL probe)." + (" Started from the base model (no SFT checkpoint existed): a random model's "
                                     "answers run to max_new_tokens, longer than a trained one's." if "base" in table else ""), "",
        table, "",
        (f"Taken under load (load average {load:.1f} on {os.cpu_count()} cores): other processes shared the CPU, so "
         f"these are lower bounds." if busy else "Taken on an otherwise idle machine."),
    ])
    write_section("bench_ppo", section)


if __name__ == "__main__":
    main()
