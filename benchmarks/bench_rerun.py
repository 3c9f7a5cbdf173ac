"""What a re-run costs after a change of settings: the tiny preset's SFT stage (`sft.run`, as notebook 02
calls it) trained, run again unchanged, trained with another learning rate, then sent back to the first
settings, which moves the first run back from `sft.stale-*` instead of training it again; then notebook
04's sweep of its checkpoints (`evaluate.sweep`) the same way, with another eval.max_attempts and back.

    python benchmarks/bench_rerun.py [--write-docs]

Runs in a temporary PAPER_RUNS_DIR: nothing under runs/ is touched.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

from _common import load_average, machine, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=None, help="SFT examples (default: the preset's 1024)")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as runs:
        os.environ["PAPER_RUNS_DIR"] = runs
        from paper_lib import config, evaluate, sft

        size = {"data__sft_size": args.examples} if args.examples else {}
        first, other = config.load("tiny", **size), config.load("tiny", sft__learning_rate=2e-3, **size)
        sft.manifest_spec(first)  # builds the data and the tiny base model, outside the timings
        steps = [("the first settings (trains)", first),
                 ("the same settings again (up to date)", first),
                 (f"sft.learning_rate {first.sft.learning_rate} -> 2e-3 (trains; the first run is moved aside)", other),
                 ("back to the first settings (moved back)", first)]
        fewer = config.load("tiny", eval__max_attempts=3, **size)
        sweeps = [("the first settings (evaluates)", first),
                  ("the same settings again (up to date)", first),
                  (f"eval.max_attempts {first.eval.max_attempts} -> 3 (evaluates; the first episodes are kept "
                   "aside)", fewer),
                  ("back to the first settings (moved back)", first)]
        rows = []
        for stage, run, cases in (("SFT", lambda cfg: sft.run(cfg, stream=False), steps),
                                  ("sweep", evaluate.sweep, sweeps)):
            for what, cfg in cases:
                started = time.perf_counter()
                run(cfg)
                rows.append((f"{stage}: {what}", time.perf_counter() - started))
        checkpoints = len(evaluate.discover_checkpoints(first))
    table = "\n".join(f"| {what} | {seconds:.2f} |" for what, seconds in rows)
    steps_run = first.data.sft_size // first.sft.per_device_batch_size
    body = f"""## Re-running SFT and evaluation after a change of settings (tiny preset)

`python benchmarks/bench_rerun.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}; {machine()};
load average before/after: {load_before:.2f} / {load_average():.2f}.

`sft.run`, as notebook 02 calls it, in a fresh runs directory, one call after another ({first.data.sft_size}
examples, {steps_run} steps). Training runs in a subprocess (`python -m paper_lib.sft`), so each trained row
includes its start (imports, model load). Then `evaluate.sweep`, as notebook 04 calls it, over the
{checkpoints} checkpoints it evaluates, in this process.

| call | seconds |
|---|---|
{table}
"""
    print(body)
    if args.write_docs:
        write_section("bench_rerun", body)


if __name__ == "__main__":
    main()
