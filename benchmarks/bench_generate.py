"""Decode speed of paper_lib.rollout.Generator by batch size and dtype: the numbers the smol preset's
sizing scales from (docs/gpu_run.md).

    python benchmarks/bench_generate.py --preset smol [--batches 1,8,32] [--dtypes float32,bfloat16] [--tokens 32]

Every sequence of a batch is the paper's prompt for a different test hand, and exactly --tokens new tokens
are generated (min_new_tokens = max_new_tokens), so the time per decode step is comparable across rows.
Prints a markdown table; --write-docs records it in docs/benchmarks.md.

--count-ops also counts, with torch.profiler, the operators one decode step dispatches at batch 1 (leaf
aten ops that compute, views left out): on a GPU each is a kernel launch, and a 135M model's step is bound
by their CPU cost, not by arithmetic, so this count is what the GPU estimate of docs/gpu_run.md scales.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import load_average, machine, write_section

from paper_lib import cards, config, data, models
from paper_lib.rollout import Generator


# aten ops that only relabel memory: no kernel runs for them on a GPU
VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose",
         "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::permute",
         "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
         "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::split", "aten::chunk",
         "aten::unbind", "aten::narrow", "aten::contiguous", "aten::result_type", "aten::item",
         "aten::_local_scalar_dense", "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel", "aten::dim"}


def ops_per_step(gen: Generator, conversation, tokens: int) -> float:
    """Leaf compute ops per decode step, from the difference of a run of 2·tokens and one of tokens new
    tokens (so the prefill and generate()'s set-up cancel)."""
    from torch.profiler import ProfilerActivity, profile

    def count(n: int) -> int:
        gen.max_new_tokens = n
        gen.model.generation_config.min_new_tokens = n
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen([conversation])
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children
                   and e.name not in VIEWS)

    return (count(2 * tokens) - count(tokens)) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--count-ops", action="store_true", help="also count the ops of one decode step (batch 1)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    load_before = load_average()
    cfg = config.load(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = data.load(cfg)["id_test"]["cards"]
    rows, op_rows = [], []
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
        if args.count_ops:
            gen = Generator(model, tokenizer, max_new_tokens=args.tokens, batch_size=1)
            op_rows.append(f"| {args.preset} | {dtype} | {ops_per_step(gen, convs[0], args.tokens):.0f} |")
            print(op_rows[-1], flush=True)
        del model
    where = torch.cuda.get_device_name() if device == "cuda" else machine()
    command = " ".join(["python", "benchmarks/bench_generate.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    body = "\n".join([
        f"## Decode speed by batch size ({args.preset} preset)", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}; {where}; torch {torch.__version__}; load average before: "
        f"{load_before:.1f}. Prefill of the prompt included in the time; ms/step = time / new tokens.", "",
        "| preset | dtype | batch | prompt tokens | new tokens | time (s) | ms per decode step | tokens/s |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        *(["Operators dispatched per decode step at batch 1 (leaf aten ops that compute; each a kernel on a GPU):",
           "", "| preset | dtype | ops per step |", "|---|---|---:|", *op_rows, ""] if op_rows else []),
        f"Taken under load (load average {load_before:.1f}); one run." if load_before > 1.0 else "One run."])
    print(body)
    if args.write_docs:
        write_section(f"bench_generate_{args.preset}", body)


if __name__ == "__main__":
    main()
