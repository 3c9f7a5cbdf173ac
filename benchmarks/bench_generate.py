"""Decode speed of paper_lib.rollout.Generator by batch size and dtype: the numbers the smol preset's
sizing scales from (docs/gpu_run.md).

    python benchmarks/bench_generate.py --preset smol [--batches 1,8,32] [--dtypes float32,bfloat16] [--tokens 32]

Every sequence of a batch is the paper's prompt for a different test hand, and exactly --tokens new tokens
are generated (min_new_tokens = max_new_tokens), so the time per decode step is comparable across rows.
Prints a markdown table; --write-docs records it in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import load_average, machine, write_section

from paper_lib import cards, config, data, models
from paper_lib.rollout import Generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    load_before = load_average()
    cfg = config.load(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = data.load(cfg)["id_test"]["cards"]
    rows = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = models.load(cfg, dtype=dtype, device=device)
        model.eval()
        model.generation_config.min_new_tokens = args.tokens  # no early stop: a fixed number of steps
        for batch in [int(b) for b in args.batches.split(",")]:
            convs = [cards.prompt_messages(cards.Hand(tuple(ids[i % len(ids)]), "id")) for i in range(batch)]
            gen = Generator(model, tokenizer, max_new_tokens=args.tokens, batch_size=batch)
            gen(convs[:1])  # warm-up
            start = time.perf_counter()
            out = gen.generate_tokens(convs)
            seconds = time.perf_counter() - start
            tokens = sum(len(g.response_ids) for g in out)
            prompt = sum(len(g.prompt_ids) for g in out) / batch
            rows.append(f"| {args.preset} | {dtype} | {batch} | {prompt:.0f} | {args.tokens} | {seconds:.2f} | "
                        f"{1000 * seconds / args.tokens:.0f} | {tokens / seconds:.0f} |")
            print(rows[-1], flush=True)
        del model
    where = torch.cuda.get_device_name() if device == "cuda" else machine()
    command = " ".join(["python", "benchmarks/bench_generate.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    body = "\n".join([
        f"## Decode speed by batch size ({args.preset} preset)", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}; {where}; torch {torch.__version__}; load average before: "
        f"{load_before:.1f}. Prefill of the prompt included in the time; ms/step = time / new tokens.", "",
        "| preset | dtype | batch | prompt tokens | new tokens | time (s) | ms per decode step | tokens/s |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Taken under load (load average {load_before:.1f}); one run." if load_before > 1.0 else "One run."])
    print(body)
    if args.write_docs:
        write_section(f"bench_generate_{args.preset}", body)


if __name__ == "__main__":
    main()
