"""Writing a direction-restored checkpoint: our shard-by-shard writer vs loading both models whole.

    python benchmarks/bench_restore.py [--layers 30] [--top 128] [--threads 1] [--vocab 49152] [--write-docs]

Two SmolLM2-135M-shaped checkpoints (LlamaConfig: hidden 576, intermediate 1536, 9 heads, 3 kv heads,
vocab 49152 unless --vocab, tied embeddings; random weights, the target a perturbed copy of the source), saved as
safetensors shards of 100 MB. Each method runs in its own subprocess so its peak RSS is its own:
- ours: paper_lib.restore.write_restored(target, source, out, Plan(top=K));
- naive: from_pretrained both models, restore_directions on every matrix in memory, save_pretrained.
Both restore the top K ranks of every matrix. Prints (and with --write-docs, records) a markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SMOLLM2_VOCAB, add_vocab_option, load_average, machine, smollm2_config, write_section


def make_checkpoints(work: Path, layers: int, vocab: int = SMOLLM2_VOCAB) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(layers, vocab))
    model.save_pretrained(work / "source", max_shard_size="100MB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(work / "target", max_shard_size="100MB")
    return work / "target", work / "source"


def worker(kind: str, target: str, source: str, out: str, top: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from paper_lib import restore, weights

    start = time.perf_counter()
    if kind == "ours":
        restore.write_restored(target, source, out, restore.Plan(top=top), device="cpu", progress=False)
    else:
        from transformers import AutoModelForCausalLM

        tgt = AutoModelForCausalLM.from_pretrained(target)
        src = dict(AutoModelForCausalLM.from_pretrained(source).named_parameters())
        with torch.no_grad():
            for name, p in tgt.named_parameters():
                if p.ndim == 2 and weights.parse_name(name):
                    p.copy_(restore.restore_directions(p.data, src[name].data, top, device="cpu"))
        tgt.save_pretrained(out, max_shard_size="100MB")
    seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--top", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    add_vocab_option(parser)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, target, source, out, threads = args.worker
        print(json.dumps(worker(kind, target, source, out, args.top, int(threads))))
        return

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_restore_") as tmp:
        work = Path(tmp)
        target, source = make_checkpoints(work, args.layers, args.vocab)
        results = {}
        for kind in ("ours", "naive"):
            cmd = [sys.executable, __file__, "--top", str(args.top),
                   "--worker", kind, str(target), str(source), str(work / f"out_{kind}"), str(args.threads)]
            results[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        import torch
        from safetensors.torch import load_file

        ours = {k: v for f in sorted((work / "out_ours").glob("*.safetensors")) for k, v in load_file(f).items()}
        naive = {k: v for f in sorted((work / "out_naive").glob("*.safetensors")) for k, v in load_file(f).items()}
        agree = max(float((ours[n] - naive[n]).abs().max()) for n in naive if n in ours)
    o, n = results["ours"], results["naive"]
    command = " ".join(["python", "benchmarks/bench_restore.py", *[a for a in sys.argv[1:] if a != "--write-docs"]])
    table = "\n".join([
        "| method | wall (s) | peak RSS (MB) |", "|---|---:|---:|",
        f"| ours: write_restored, shard by shard | {o['seconds']:.1f} | {o['peak_mb']:.0f} |",
        f"| naive: both models whole, save_pretrained | {n['seconds']:.1f} | {n['peak_mb']:.0f} |",
        f"| naive / ours | {n['seconds'] / o['seconds']:.2f}x | {n['peak_mb'] / o['peak_mb']:.2f}x |"])
    load = load_before  # the load other processes put on the machine; the run itself adds its own
    body = "\n".join([
        "## Writing a restored checkpoint (SmolLM2-135M shape)", "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}; {machine()}; torch {torch.__version__}; "
        f"{args.layers} layers, vocab {args.vocab}, top {args.top} ranks of every matrix restored, "
        f"{args.threads} torch thread(s).", "",
        table, "",
        f"Largest difference between the two outputs: {agree:.1e}. "
        + (f"Taken under load (load average {load:.1f}); ratios are from one run." if load > 1.0
           else "Taken on an otherwise idle machine; ratios are from one run.")])
    print(body)
    if args.write_docs:
        write_section("bench_restore", body)


if __name__ == "__main__":
    main()
