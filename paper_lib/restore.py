"""Direction restore (PAPER_SPEC 6): put a source model's singular directions into a target model.

    W' = U_src[:, S] Σ[S] V_src[:, S]ᵀ + U_tgt[:, R] Σ_tgt[R] V_tgt[:, R]ᵀ

S is the restored set of ranks (the top `top`, and optionally the bottom `tail`), R the rest. With
keep="target-sigma" (the paper's UV restore) Σ[S] is the target's, so only directions move. With
keep="source" whole triplets are swapped, σ included: the variant of the authors' svd_recover.py.
keep="target-sigma-reset" is the authors' svd_recover_dir scripts: the target's σ while S is part of
the ranks, the source matrix whole once S is all of them (k >= rank: Qwen's k/v_proj, rank 512, at
every k of their sweeps; at k = 3584 every Qwen2.5-7B matrix, whose ranks are all <= 3584, so that
point is the source's weights with the target's norms and biases; and every matrix of their
layer-wise runs, whose k is 4096).

Restored checkpoints keep the target's dtype (bf16 for the hub models). The authors' recover scripts
loaded both models in float16 and saved the whole restored model `.half()`, while their unrestored
references stayed in their own dtype: a second, small difference between restored and reference in
their numbers, which this project does not copy.

Checkpoints are written tensor by tensor into shards with the target's index, so peak memory is about a
shard, never a model. Decompositions come from the spectra stage's on-disk cache when given.

    python -m paper_lib.restore --target T --source S (--layers 0-9 | --top K [--tail K]) --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import artifacts, launch, weights
from .config import Config

RESTORE_MANIFEST = "restore_manifest.json"  # what a restore wrote: plan, inputs, the ranks of each matrix

log = logging.getLogger(__name__)
KEEP = ("target-sigma", "source", "target-sigma-reset")
_SIDE_FILES = (".json", ".jinja", ".txt", ".model", ".tiktoken")  # config, tokenizer, chat template
_TRAINING_STATE = ("trainer_state.json",)


def restore_directions(W_tgt: torch.Tensor, W_src: torch.Tensor, top: int, tail: int = 0,
                       keep: str = "target-sigma", *, dtype: str = "float32", device: str = "auto",
                       svd_tgt: tuple | None = None, svd_src: tuple | None = None) -> torch.Tensor:
    """W_tgt with the directions of its top `top` (and bottom `tail`) ranks taken from W_src.

    top = 0 and tail = 0 return W_tgt unchanged; top = rank gives U_src Σ_tgt V_srcᵀ (keep="target-sigma")
    or W_src exactly (keep="source" or "target-sigma-reset", as the authors' scripts return the source at
    full rank). Precomputed thin SVDs (U, S, Vh) may be passed to skip the decompositions.
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if W_tgt.shape != W_src.shape or W_tgt.ndim != 2:
        raise ValueError(f"target and source must be matrices of one shape, got {tuple(W_tgt.shape)} and "
                         f"{tuple(W_src.shape)}")
    if top < 0 or tail < 0:
        raise ValueError(f"top and tail must be >= 0, got {top}, {tail}")
    rank = min(W_tgt.shape)
    top = min(top, rank)
    tail = min(tail, rank - top)
    if top == 0 and tail == 0:
        return W_tgt.clone()
    if keep != "target-sigma" and top + tail == rank:  # every triplet swapped: the source itself, exactly,
        return W_src.to(device=W_tgt.device, dtype=W_tgt.dtype, copy=True)  # in the target's dtype as the rest
    Ut, St, Vht = svd_tgt if svd_tgt is not None else weights.decompose(W_tgt, dtype, device)
    Us, Ss, Vhs = svd_src if svd_src is not None else weights.decompose(W_src, dtype, device)
    sigma = Ss.to(St) if keep == "source" else St
    Us, Vhs = Us.to(Ut), Vhs.to(Ut)
    # The restored ranks are [0, top) and [rank - tail, rank), the kept ones [top, rank - tail): slices are
    # views, and U[:, S] * σ[S] is U[:, S] diag(σ[S]) without forming the diagonal.
    out = (Ut[:, top:rank - tail] * St[top:rank - tail]) @ Vht[top:rank - tail]
    out += (Us[:, :top] * sigma[:top]) @ Vhs[:top]
    if tail:
        out += (Us[:, rank - tail:] * sigma[rank - tail:]) @ Vhs[rank - tail:]
    return out.to(device=W_tgt.device, dtype=W_tgt.dtype)


@dataclass(frozen=True)
class Plan:
    """Which matrices to restore and how many ranks.

    layers: inclusive (first, last) layer range, or None for every matrix (embed_tokens and lm_head too);
    top: ranks restored from the top (None = full rank); tail: ranks from the bottom;
    modules: module kinds to restore (e.g. ("q_proj", "up_proj")), None for all;
    with_embeddings: with `layers`, also embed_tokens and lm_head (the authors' Llama layer script).
    """

    layers: tuple[int, int] | None = None
    top: int | None = None
    tail: int = 0
    keep: str = "target-sigma"
    modules: tuple[str, ...] | None = None
    with_embeddings: bool = False

    def applies(self, key: str) -> bool:
        parsed = weights.parse_name(key)
        if parsed is None:
            return False
        _, layer, _, module = parsed
        if self.modules is not None and module not in self.modules:
            return False
        if self.layers is None:
            return True
        if layer < 0:  # embed_tokens, lm_head
            return self.with_embeddings
        return self.layers[0] <= layer <= self.layers[1]


def _model_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise weights.WeightsError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def write_restored(target: str | Path, source: str | Path, out: str | Path, plan: Plan, *,
                   dtype: str = "float32", device: str = "auto", cache_dir: str | Path | None = None,
                   progress: bool = True, replace: bool = False) -> Path:
    """Write `target` with `plan`'s matrices direction-restored from `source`, as a full HF checkpoint at
    `out` (the target's shards, index, config and tokenizer; no training state). Returns `out`.

    `out` must not exist, be empty, or (with replace=True) hold a previous restore output; it may not be,
    or contain, an input. Everything is checked before anything is written."""
    if plan.keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {plan.keep!r}")
    if (plan.top is not None and plan.top < 0) or plan.tail < 0:
        raise ValueError(f"--top and --tail must be >= 0, got {plan.top}, {plan.tail}")
    _check_out(Path(out), [Path(target), Path(source)], replace)
    weights.resolve_device(device)  # a missing CUDA is one line before any output exists
    tgt, src = weights.LazyWeights("target", target), weights.LazyWeights("source", source)
    weights.warn_if_model_types_differ([tgt, src], "a restore between them restores a fine-tuning's rotation")
    num_layers, src_layers = _dims(tgt)[0], _dims(src)[0]
    if src_layers != num_layers:  # same-shaped layers of two depths: not one model, though every shape fits
        raise weights.WeightsError(f"target {tgt.path} has {num_layers} layers, source {src.path} "
                                   f"{src_layers}; restore between checkpoints of one model")
    if plan.layers is not None and plan.layers[1] >= num_layers:
        raise weights.WeightsError(f"--layers {plan.layers[0]}-{plan.layers[1]} goes past the last layer of "
                                   f"{tgt.path}, which has layers 0-{num_layers - 1}; choose layers within them")
    selected = [k for k in tgt.names if plan.applies(k)]
    missing = [k for k in selected if k not in src.names or src.shapes[k] != tgt.shapes[k]]
    if missing:
        raise weights.WeightsError(f"source {src.path} lacks or reshapes {len(missing)} matrices the plan "
                                   f"restores, e.g. {missing[:3]}; restore between checkpoints of one model")
    if not selected:
        raise weights.WeightsError(f"the plan {plan} selects no matrix of {tgt.path}")
    out = Path(out)
    for leftover in out.parent.glob(f".{out.name}.partial*"):  # our own scratch, left by a killed restore
        shutil.rmtree(leftover, ignore_errors=True)
    # _check_out has checked out: empty, or a previous restore output. An error or Ctrl-C inside leaves no
    # half-written checkpoint beside it (gigabytes at 7B).
    with artifacts.atomic_dir(out) as tmp:
        record = _write_shards(tgt, src, tmp, plan, selected, dtype, device, cache_dir, progress, out.name)
        written = sorted(p.name for p in tmp.iterdir()) + [RESTORE_MANIFEST]
        (tmp / RESTORE_MANIFEST).write_text(json.dumps({
            "target": str(tgt.path.resolve()), "source": str(src.path.resolve()), "plan": asdict(plan),
            "dtype": dtype, "restored": record, "files": written}, indent=2))
    if plan.top == 0 and plan.tail == 0:
        log.warning("--top 0 restores no rank: %s is a copy of the target", out)
    clamped = sorted({(r["top"], r["rank"]) for r in record if plan.top is not None and r["top"] < plan.top})
    if clamped:
        log.warning("--top %d exceeds the rank of some matrices; clamped to their rank: %s", plan.top,
                    ", ".join(f"rank {rank}" for _, rank in clamped))
    return out


def _write_shards(tgt: weights.LazyWeights, src: weights.LazyWeights, tmp: Path, plan: Plan, selected: list[str],
                  dtype: str, device: str, cache_dir, progress: bool, label: str) -> list[dict]:
    """The target's shards, side files (config, tokenizer) and index into `tmp`, the planned matrices
    restored; returns what was restored, one record a matrix."""
    to_key = {name: key for key, name in tgt.names.items()}
    record, selected = [], set(selected)
    bar = tqdm(total=len(selected), desc=f"restore -> {label}", disable=not progress, leave=False)
    for shard in _model_files(tgt.path):
        tensors = {}
        with safe_open(str(tgt.path / shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                W = f.get_tensor(name)
                key = to_key.get(name)
                if key in selected:
                    rank = min(W.shape)
                    top = rank if plan.top is None else plan.top
                    svd_t = weights.load_or_decompose(W, name, cache_dir, dtype, device)
                    W_src = src.load(key)
                    svd_s = weights.load_or_decompose(W_src, src.names[key], cache_dir, dtype, device)
                    W = restore_directions(W, W_src, top, plan.tail, plan.keep, svd_tgt=svd_t, svd_src=svd_s)
                    record.append({"name": name, "top": min(top, rank), "tail": min(plan.tail, rank - min(top, rank)),
                                   "rank": rank})
                    bar.update()
                tensors[name] = W.contiguous()
        save_file(tensors, str(tmp / shard), metadata=metadata)
        del tensors
    bar.close()
    for side in tgt.path.iterdir():
        if side.is_file() and side.suffix in _SIDE_FILES and side.name not in _TRAINING_STATE:
            shutil.copy2(side, tmp / side.name)
    return record


def replaced_whole(checkpoint: str | Path) -> bool:
    """Whether a restore took every matrix it touched whole from the source (k reached each one's rank, with
    keep "source" or "target-sigma-reset"): the source's weights with the target's norms and biases, which is
    a reset, not a direction restore (the authors' top-3584 runs on Qwen2.5-7B). False when unknown."""
    found = artifacts.read_json(Path(checkpoint) / RESTORE_MANIFEST) or {}
    record, keep = found.get("restored") or [], (found.get("plan") or {}).get("keep")
    return keep != "target-sigma" and bool(record) and all(r["top"] + r["tail"] >= r["rank"] for r in record)


def _check_out(out: Path, inputs: list[Path], replace: bool) -> None:
    """Refuse an output directory that is, lies inside or contains an input, or holds anything but a
    previous restore output (which needs replace=True): restore never deletes what it did not write."""
    artifacts.check_out_apart(out, inputs)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / RESTORE_MANIFEST).is_file():
        raise artifacts.ArtifactError(f"--out {out} exists and is not a previous restore output; choose a new "
                                      f"or empty directory (nothing was changed)")
    if not replace:
        raise artifacts.ArtifactError(f"--out {out} holds a previous restore output; pass --force to replace it")
    theirs = _not_written_by_restore(out)
    if theirs:
        raise artifacts.ArtifactError(f"--out {out} holds a previous restore output and files restore did not "
                                      f"write ({', '.join(theirs[:4])}{', ...' if len(theirs) > 4 else ''}); "
                                      f"move them out, or choose another --out (nothing was changed)")


def _not_written_by_restore(out: Path) -> list[str]:
    """What a previous restore output holds beside what restore wrote there (its manifest's list; before the
    list, the shards and side files) and the pipeline's manifest: replacing it would delete those."""
    listed = (artifacts.read_json(out / RESTORE_MANIFEST) or {}).get("files")
    def ours(p: Path) -> bool:
        if p.name == artifacts.MANIFEST or artifacts.is_leftover(p.name):  # the pipeline's, or a killed write's
            return True
        if listed is not None:
            return p.name in listed
        return p.is_file() and (p.suffix in (".safetensors", *_SIDE_FILES) or p.name == RESTORE_MANIFEST)
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not ours(p))


def restored_checkpoint(cfg: Config, name: str, target: artifacts.Checkpoint, source: artifacts.Checkpoint,
                        plan: Plan, force: bool = False) -> artifacts.Checkpoint:
    """runs/<preset>/restore/<name>: `target` with `plan` restored from `source`, written once (a manifest
    of both checkpoints' weights and the plan decides), ready for evaluate.evaluate_checkpoint. A restore
    of other inputs or settings there is moved aside to <name>.stale-<time>, as SFT and RL runs are."""
    out = artifacts.restore_dir(cfg) / name
    spec = {"stage": "restore", "target": artifacts.fingerprint(target.path), "source": artifacts.fingerprint(source.path),
            "plan": asdict(plan), "dtype": cfg.spectra.dtype, "code": artifacts.code_hash("restore")}
    # another setting's restore is moved aside, and moved back when its settings return: same file times,
    # so its kept episodes still match and nothing is restored or evaluated again
    artifacts.keep_earlier_result(out, spec, f"restoring {name} again", force)
    if force or not artifacts.up_to_date(out, spec, f"pass force=True to rebuild {out}"):
        started = time.time()
        write_restored(target.path, source.path, out, plan, dtype=cfg.spectra.dtype, device=cfg.spectra.device,
                       cache_dir=weights.svd_cache(cfg), replace=True)
        artifacts.write_manifest(out, spec, target_label=target.label, source_label=source.label,
                                 seconds=round(time.time() - started, 2),
                                 device=artifacts.device_in_use(weights.resolve_device(cfg.spectra.device).type))
    return artifacts.Checkpoint(name, "restore", 0, out)


def model_dims(checkpoint: str | Path) -> tuple[int, int]:
    """(number of layers, hidden size) of a checkpoint, read from its weight names and shapes; the hidden
    size bounds the rank of q/o/gate/up/down, so "20% of the ranks" means 20% of it."""
    return _dims(weights.LazyWeights("model", checkpoint))


def _dims(ckpt: weights.LazyWeights) -> tuple[int, int]:
    parsed = [(weights.parse_name(key), shape) for key, shape in ckpt.shapes.items()]
    layers = {p[1] for p, _ in parsed if p and p[1] >= 0}
    hidden = [min(shape) for p, shape in parsed if p and p[3] in ("q_proj", "o_proj")]
    if not layers or not hidden:
        raise weights.WeightsError(f"checkpoint {ckpt.label!r} ({ckpt.path}) has no attention layers "
                                   f"(layers.N.self_attn.q_proj.weight ...): nothing to restore by layer or rank")
    return max(layers) + 1, max(hidden)


def _parse_layers(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        layers = int(first), int(last or first)
    except ValueError:
        layers = None
    if layers is None or not 0 <= layers[0] <= layers[1]:
        raise argparse.ArgumentTypeError(f"layers look like 0-9 or 5 (first <= last), got {text!r}")
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_lib.restore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="checkpoint written out with the restored matrices "
                        "(its singular values kept, unless --keep source)")
    parser.add_argument("--source", required=True, help="checkpoint whose directions are restored")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--layers", type=_parse_layers, help="restore every matrix of these layers, e.g. 0-9 "
                     "(embed_tokens and lm_head stay the target's)")
    how.add_argument("--top", type=int, help="restore the top K ranks of every matrix")
    how.add_argument("--all", action="store_true", help="every rank of every matrix (the causal test)")
    parser.add_argument("--tail", type=int, default=0, help="also restore the bottom K ranks (with --top)")
    parser.add_argument("--keep", choices=KEEP, default="target-sigma",
                        help="target-sigma: the target's singular values, the source's directions (the paper's "
                        "UV restore); source: whole triplets (the authors' svd_recover.py); target-sigma-reset: "
                        "as target-sigma, but a matrix restored at every rank is the source's (svd_recover_dir)")
    parser.add_argument("--out", required=True, help="new or empty directory for the restored checkpoint")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", help="SVD cache directory shared with python -m paper_lib.spectra --cache")
    parser.add_argument("--force", action="store_true", help="replace --out when it holds a previous restore output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.tail and args.top is None:  # --layers and --all restore every rank: a tail would be ignored
        parser.error("--tail goes with --top K only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = Plan(layers=args.layers, top=args.top, tail=args.tail, keep=args.keep)
    return launch.run_main(lambda: "wrote " + str(write_restored(
        args.target, args.source, args.out, plan, dtype=args.dtype, device=args.device, cache_dir=args.cache,
        progress=not args.quiet, replace=args.force)))


if __name__ == "__main__":
    sys.exit(main())
