"""Batched evaluator vs a one-episode-at-a-time loop, same checkpoint, same hands, greedy decoding.

    python benchmarks/bench_eval.py --preset tiny [--checkpoint DIR] [--hands 64] [--batch-size 128]

Prints a markdown row: hands, wall time of each, speed-up, and how often the two agree on success
(left padding can change a greedy token where two logits tie, so agreement is reported, not assumed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _common import cpu_name, load_average, write_section

from paper_lib import cards, config, data, models
from paper_lib.rollout import Generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", help="HF checkpoint dir (default: the preset's base model)")
    p.add_argument("--hands", type=int, default=64, help="hands per rule")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--write-docs", action="store_true", help="record the result in docs/benchmarks.md")
    args = p.parse_args()
    load_before = load_average()

    cfg = config.load(args.preset)
    model, tokenizer = models.load(cfg, checkpoint=args.checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    splits = data.load(cfg)
    hands = [cards.Hand(tuple(c), rule) for rule, split in (("id", "id_test"), ("ood", "ood_test"))
             for c in splits[split]["cards"][:args.hands]]
    steps = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)

    batched = Generator(model, tokenizer, batch_size=args.batch_size, **steps)
    start = time.perf_counter()
    fast = cards.run_episodes(batched, hands, cfg.eval.max_attempts)
    t_batched = time.perf_counter() - start

    single = Generator(model, tokenizer, batch_size=1, **steps)
    start = time.perf_counter()
    slow = [cards.run_episodes(single, [h], cfg.eval.max_attempts)[0] for h in hands]
    t_single = time.perf_counter() - start

    agree = sum(a.success == b.success for a, b in zip(fast, slow)) / len(hands)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {cpu_name()})"
    table = "\n".join([
        "| preset | checkpoint | episodes | batched (s) | one at a time (s) | speed-up | success agreement | device |",
        "|---|---|---|---|---|---|---|---|",
        f"| {cfg.preset} | {args.checkpoint or 'base'} | {len(hands)} | {t_batched:.1f} | {t_single:.1f} | "
        f"{t_single / t_batched:.1f}x | {agree:.0%} | {device} |"])
    command = " ".join(["python", "benchmarks/bench_eval.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    load = load_before  # the load other processes put on the machine; the run itself adds its own
    body = "\n".join([
        f"## Batched evaluation vs one episode at a time ({cfg.preset} preset, {model.dtype})", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; greedy decoding, "
        f"max_new_tokens {cfg.eval.max_new_tokens}, up to {cfg.eval.max_attempts} attempts per episode, batch "
        f"{args.batch_size}.", "", table, "",
        f"Taken under load (load average {load:.1f}); one run." if load > 1.0 else "Taken on an idle machine; one run."])
    print(body)
    if args.write_docs:
        name = "bench_eval" if cfg.preset == "tiny" else f"bench_eval_{cfg.preset}"
        write_section(name + ("_gpu" if torch.cuda.is_available() else ""), body)  # beside the CPU's, not over it


if __name__ == "__main__":
    main()
