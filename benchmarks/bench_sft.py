"""Benchmark paper_lib.sft: SFT throughput on CPU for the tiny preset, in tokens per second.

Builds the tiny preset's trainer exactly as `python -m paper_lib.sft` does (sft.build_trainer: TRL's
SFTTrainer, completion-only loss, the preset's batch size and max_length) and trains one epoch over
`--examples` SFT examples, with evaluation and checkpoints pushed past the end (the final step still
evaluates and saves, outside the timed steps). Timed: the training steps only (Trainer on_step_begin to
on_step_end: forward, backward, optimizer). Tokens: every non-pad token trained on (prompt + answer)
and the answer tokens that carry the loss. Each thread count runs in its own subprocess.

    python benchmarks/bench_sft.py                          # threads 1 and 2, 1024 examples
    python benchmarks/bench_sft.py --threads 2 --examples 256
    python benchmarks/bench_sft.py --write-docs             # also (re)write its section of docs/benchmarks.md
    python benchmarks/bench_sft.py --preset smol --threads 2 --examples 32 --batch 8   # the real 135M model
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DOCS, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| preset | threads | steps × batch | trained tokens | answer tokens | step time (s) | tokens/s "
          "| answer tokens/s | s/step | wall incl. final eval+save (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def worker(threads: int, examples: int, runs_dir: str, preset: str = "tiny", batch: int = 0) -> dict:
    os.environ["PAPER_RUNS_DIR"] = runs_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import TrainerCallback

    from paper_lib import config, sft

    torch.set_num_threads(threads)
    batch_overrides = {"sft.per_device_batch_size": batch, "sft.gradient_accumulation_steps": 1} if batch else {}
    cfg = config.load(preset, data__sft_size=examples, sft__eval_steps=10**6, sft__save_steps=10**6,
                      sft__max_steps=-1, sft__epochs=1, **batch_overrides)
    trainer = sft.build_trainer(cfg)
    trainer.args.eval_on_start = False
    trainer.args.disable_tqdm = True
    ds = trainer.train_dataset
    tokens = sum(len(ids) for ids in ds["input_ids"])
    answer = sum(sum(label != -100 for label in labels) for labels in ds["labels"])

    class Timer(TrainerCallback):
        def __init__(self):
            self.total, self.steps, self.t0 = 0.0, 0, None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.total += time.perf_counter() - self.t0
            self.steps += 1

    timer = Timer()
    trainer.add_callback(timer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {"preset": preset, "threads": threads, "steps": timer.steps, "batch": cfg.sft.per_device_batch_size,
            "examples": len(ds), "tokens": tokens, "answer_tokens": int(answer), "step_seconds": timer.total,
            "wall_seconds": wall}


def row(r: dict) -> str:
    return (f"| {r['preset']} | {r['threads']} | {r['steps']} × {r['batch']} | {r['tokens']:,} | {r['answer_tokens']:,} "
            f"| {r['step_seconds']:.1f} | {r['tokens'] / r['step_seconds']:,.0f} "
            f"| {r['answer_tokens'] / r['step_seconds']:,.0f} | {r['step_seconds'] / r['steps']:.3f} "
            f"| {r['wall_seconds']:.1f} |")


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def _load1(text: str) -> float:
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, one run each")
    parser.add_argument("--examples", type=int, default=1024, help="SFT examples (one epoch; tiny's default 1024)")
    parser.add_argument("--preset", default="tiny", help="preset whose model and trainer are timed")
    parser.add_argument("--batch", type=int, default=0, help="per-device batch, no accumulation (0: the preset's)")
    parser.add_argument("--write-docs", action="store_true", help=f"(re)write this benchmark's section of {DOCS}")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.examples, args.runs_dir, args.preset, args.batch)))
        return

    results, load_before = [], loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as runs:
        for threads in [int(t) for t in args.threads.split(",")]:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
            proc = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--examples", str(args.examples),
                                   "--runs-dir", runs, "--preset", args.preset, "--batch", str(args.batch)], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"worker with {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(row(results[-1]), flush=True)
    command = "python benchmarks/bench_sft.py " + " ".join(sys.argv[1:])
    from paper_lib import config

    cfg = config.load(args.preset)
    arch, max_length = cfg.model.tiny, cfg.sft.max_length
    model = (f"{arch.layers}-layer, hidden-{arch.hidden_size} Qwen2, vocab {arch.vocab_size}" if cfg.model.name == "tiny"
             else "SmolLM2-135M-Instruct, 30 layers, hidden 576" if cfg.model.name == "smol" else cfg.model.name)
    section = "\n".join([
        f"## SFT throughput on CPU ({args.preset} preset)",
        "",
        f"`{command.strip()}` on {datetime.date.today().isoformat()}; {machine()}; "
        f"torch {__import__('torch').__version__}; load average before/after: {load_before} / {loadavg()}.",
        "",
        f"One epoch of the {args.preset} preset's SFT ({model}, "
        f"batch {results[0]['batch']}, max_length {max_length}, fp32) through "
        "`sft.build_trainer`, the trainer `python -m paper_lib.sft` uses. Step time sums the training steps only "
        "(forward, backward, AdamW); trained tokens are every non-pad token (prompt + answer), answer tokens "
        "those that carry the loss.",
        "",
        HEADER,
        *[row(r) for r in results],
    ])
    busy = max(_load1(load_before), _load1(loadavg()))
    if busy > 0.5:
        section += (f"\n\nTaken under load: other processes kept the machine busy (1-minute load average "
                    f"{busy:.1f} on {len(os.sched_getaffinity(0))} cores), so these are lower bounds, and a run "
                    f"with as many threads as cores competes with them for every core (hence slower than one "
                    f"thread here). Rerun on an idle machine for clean numbers.")
    print("\n" + section)
    if args.write_docs:
        write_section("bench_sft" if args.preset == "tiny" else f"bench_sft_{args.preset}", section)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
