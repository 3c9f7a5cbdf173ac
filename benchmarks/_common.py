"""What every benchmark script shares: the machine line, its own section of docs/benchmarks.md, and the
SmolLM2-135M shape of the random checkpoints the spectra and restore benchmarks write.

Scripts run as `python benchmarks/bench_x.py`, which puts this folder on sys.path.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# PAPER_BENCHMARKS_DOC: another page to write, e.g. outside a repo copy that is replaced while a run goes on
DOCS = Path(os.environ.get("PAPER_BENCHMARKS_DOC") or Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
HEADER = ("# Benchmarks\n\nEach section is written by the script it names, with the exact command, machine and "
          "date; rerun the command to refresh it.\n")
SMOLLM2_VOCAB = 49152


def smollm2_config(layers: int, vocab: int = SMOLLM2_VOCAB):
    """SmolLM2-135M's LlamaConfig (hidden 576, intermediate 1536, 9 heads, 3 kv heads, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=vocab, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)


def add_vocab_option(parser) -> None:
    parser.add_argument("--vocab", type=int, default=SMOLLM2_VOCAB,
                        help=f"vocabulary of the random init (default {SMOLLM2_VOCAB}, SmolLM2's); a small one "
                        "makes a quick run, since the embedding is the largest matrix")


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> str:
    return f"nproc {len(os.sched_getaffinity(0))}, {cpu_name()}, {platform.system()}"


def load_average() -> float:
    """The 1-minute load average (0.0 where unknown): a benchmark says when it ran under load."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def write_section(name: str, body: str) -> None:
    """Replace the section between `<!-- name:start -->` and `<!-- name:end -->` (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOCS.read_text() if DOCS.is_file() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
