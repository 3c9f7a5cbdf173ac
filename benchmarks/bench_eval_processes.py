"""A notebook's evaluation sweep (`evaluate.sweep`, as 04_eval calls it) in this one process against the same
sweep dealt out to several processes (eval.num_processes, `paper_lib.evaluate --split checkpoints`), on
copies of the tiny preset's base model. The launch pays for its processes' start (imports, process group)
once a sweep; each process then plays whole checkpoints. Both sweeps play the same episodes.

    python benchmarks/bench_eval_processes.py [--checkpoints 6] [--processes 2] [--write-docs]

On a CPU the processes share its cores (each takes cores / processes threads), so this measures what the
launch costs more than what it gains; on GPUs each process has one to itself. Runs in a temporary
PAPER_RUNS_DIR: nothing under runs/ is touched.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

from _common import load_average, machine, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=6, help="copies of the base model to evaluate")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    load_before = load_average()
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        os.environ["PAPER_RUNS_DIR"] = runs
        import torch

        from paper_lib import artifacts, config, evaluate, models

        base = models.base_model_path(config.load("tiny"))  # built once, outside the timings
        listed = [artifacts.Checkpoint(f"copy-{i}", "other", 0, shutil.copytree(base, f"{runs}/copies/{i}"))
                  for i in range(args.checkpoints)]
        multi = "multi_cpu" if not torch.cuda.is_available() else "multi_gpu"
        tables, threads = {}, {}
        for name, processes, settings in (
                ("this process", 1, {}),
                (f"{args.processes} processes ({multi})", args.processes,
                 {"eval__num_processes": args.processes, "eval__accelerate_config": multi})):
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // processes))  # the launched processes' threads
            threads[name] = torch.get_num_threads() if processes == 1 else int(os.environ["OMP_NUM_THREADS"])
            cfg = config.load("tiny", **settings)
            evaluate.held_out_hands(cfg)  # the data, outside the timings
            started = time.perf_counter()
            tables[name] = evaluate.sweep(cfg, force=True, checkpoints=listed, table_name=f"bench-{processes}")
            rows.append((name, processes, time.perf_counter() - started))
        one, several = tables.values()
        same = one.equals(several)
    table = "\n".join(f"| {name} | {n} | {threads[name]} | {seconds:.1f} | {seconds / args.checkpoints:.2f} |"
                      for name, n, seconds in rows)
    command = " ".join(["python", "benchmarks/bench_eval_processes.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    body = f"""## An evaluation sweep in one process and dealt out to several (tiny preset)

`{command}` on {datetime.date.today()}; {machine()}; load average before/after: {load_before:.2f} /
{load_average():.2f}.

`evaluate.sweep(force=True)`, as notebook 04 calls it, over {args.checkpoints} copies of the tiny base model
({cfg.data.test_size} ID + {cfg.data.test_size} OOD hands, up to {cfg.eval.max_attempts} attempts, greedy). With
eval.num_processes above 1 the sweep launches `paper_lib.evaluate --split checkpoints` once and each process
plays whole checkpoints. Same success table from both: {"yes" if same else "NO"}.

| sweep | processes | threads each | seconds | seconds a checkpoint |
|---|---|---|---|---|
{table}
"""
    print(body)
    if args.write_docs:
        write_section("bench_eval_processes", body)


if __name__ == "__main__":
    main()
