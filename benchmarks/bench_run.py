"""The timings of a finished run, read from its own records: what each notebook took, SFT tokens/s and MFU,
PPO seconds per update split into generation and optimisation, evaluation episodes/s per checkpoint, and the
spectra and restore stages. Nothing is rerun: it reads runs/<preset>/ (the stages' manifests, rl/metrics.csv
and the executed notebooks of ./run_all.sh). Only the work done within the run's window counts: a stage
reused from an earlier run is listed as reused.

    python benchmarks/bench_run.py --preset smol [--write-docs] [--peak-tflops 989]
    python benchmarks/bench_run.py --preset smol --spectra-pair runs/smol/models/base runs/smol/sft/checkpoint-300 \\
        --spectra-on cuda,cuda:gesvdj,cpu       # also time one spectra pair afresh on each device[:svd driver]

MFU is 6·N FLOPs per trained token (N: every parameter of the base model; attention's own FLOPs left out, so a
lower bound) over the GPU's dense bf16 peak (--peak-tflops, else known by the GPU's name).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import write_section

from paper_lib import artifacts, config, plan

# Dense bf16 peak TFLOP/s by the GPU's name (datasheets, SXM parts; no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def parse_time(stamp: str) -> float:
    """Seconds since the epoch of a manifest's or papermill's ISO time."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def notebooks(run: Path) -> pd.DataFrame:
    """One row per executed notebook of ./run_all.sh: its wall time, start and end (papermill's metadata)."""
    rows = []
    for path in sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if path.name.endswith(".source.ipynb"):
            continue
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("start_time") and meta.get("end_time"):
            rows.append({"notebook": path.stem, "seconds": meta["duration"], "start": parse_time(meta["start_time"]),
                         "end": parse_time(meta["end_time"]), "failed": bool(meta.get("exception"))})
    return pd.DataFrame(rows, columns=["notebook", "seconds", "start", "end", "failed"])


def stages(run: Path) -> pd.DataFrame:
    """Every finished stage under the run (one row per manifest) with what its provenance records."""
    rows = []
    for path in sorted(run.rglob(artifacts.MANIFEST)):
        if any(artifacts.is_leftover(part) for part in path.parts) or "svd_cache" in path.parts:
            continue
        found = artifacts.read_manifest(path.parent) or {}
        done = found.get("provenance", {})
        rows.append({**done, "dir": str(path.parent.relative_to(run)), "stage": found.get("stage", path.parent.name),
                     "finished": parse_time(done["finished"]) if "finished" in done else float("nan")})
    # every column read below, present even where no stage of that kind (or an older one) recorded it
    return pd.DataFrame(rows).reindex(columns=list(dict.fromkeys(
        ["dir", "stage", "finished", "device", "seconds", "episodes", "attempts", "train_tokens", "train_seconds",
         "final_step", "processes", *(k for r in rows for k in r)])))


def base_parameters(run: Path) -> int | None:
    """Parameters of the run's base model, from its safetensors headers (a tied embedding is stored once);
    None where the base model is not here (a run's records copied without it)."""
    from safetensors import safe_open

    shards = sorted((run / "models" / "base").glob("*.safetensors"))
    if not shards:
        return None
    total = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                total += int(pd.Series(f.get_slice(name).get_shape()).prod())
    return total


def peak_tflops(device: str, given: float | None) -> float | None:
    return given if given else next((v for k, v in PEAK_TFLOPS.items() if k in device), None)


def timed_here(table: pd.DataFrame, nbs: pd.DataFrame) -> pd.Series:
    """Which stages finished while one of the executed notebooks ran (all of them when there are none): the
    others were reused from an earlier run, and their seconds say nothing of this one."""
    if nbs.empty:
        return pd.Series(True, index=table.index)
    return pd.concat([table["finished"].between(r.start, r.end) for r in nbs.itertuples()], axis=1).any(axis=1)


def sft_row(done: pd.Series, parameters: int | None, peak: float | None) -> dict:
    tokens_per_s = done["train_tokens"] / done["train_seconds"]
    flops = 6 * parameters * tokens_per_s if parameters else None
    return {"steps": int(done["final_step"]), "processes": int(done["processes"]), "tokens": int(done["train_tokens"]),
            "train_s": done["train_seconds"], "stage_s": done["seconds"], "tokens_per_s": tokens_per_s,
            "tflops": flops / 1e12 if flops else None, "mfu": flops / (peak * 1e12) if flops and peak else None}


def ppo_row(metrics: pd.DataFrame) -> dict:
    """Means over the updates after the first (plan.steady: the first pays for warm-up)."""
    m = plan.steady(metrics)
    rollout, total = m["rollout_seconds"].mean(), m["seconds"].mean()
    return {"updates": len(metrics), "averaged": len(m), "attempts": m["attempts"].mean(),
            "rollout_tokens_per_s": m["response_tokens"].sum() / m["rollout_seconds"].sum(),
            "rollout_s": rollout, "optimisation_s": total - rollout, "update_s": total}


def time_spectra(pair: list[str], targets: list[str], k: int) -> list[dict]:
    """analyze_pairs on one pair afresh (no SVD cache) for each `device[:svd driver]`, each after a small SVD
    there, so that no device is charged for starting CUDA and its solver libraries."""
    import torch

    from paper_lib import spectra

    rows = []
    for target in targets:
        device, _, driver = target.partition(":")
        torch.linalg.svd(torch.randn(64, 32, device=device), full_matrices=False)
        with tempfile.TemporaryDirectory(prefix="bench_run-") as out:
            started = time.perf_counter()
            table = spectra.analyze_pairs({"a": pair[0], "b": pair[1]}, [("a", "b")], out, k=k, device=device,
                                          svd_driver=driver or None, progress=False)
            seconds = time.perf_counter() - started
        rows.append({"on": target, "device": artifacts.device_in_use(device), "matrices": len(table),
                     "seconds": seconds})
    return rows


def shown(path: Path) -> str:
    """A path as a reader would type it: relative to the project where it lies inside."""
    return str(path.relative_to(config.PROJECT_ROOT)) if path.is_relative_to(config.PROJECT_ROOT) else str(path)


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    return f"{value:,.{digits}f}"


def report(cfg: config.Config, peak_given: float | None, spectra_rows: list[dict], command: str) -> str:
    run = artifacts.run_dir(cfg)
    nbs, done = notebooks(run), stages(run)
    if nbs.empty and done.empty:  # an empty DataFrame of stages() still has its columns
        sys.exit(f"bench_run: nothing to read in {run}; run `./run_all.sh {cfg.preset}` first")
    fresh = done[timed_here(done, nbs)]
    device = fresh["device"].mode().iloc[0] if fresh["device"].notna().any() else "unknown"
    code = fresh["git"].mode().iloc[0] if "git" in fresh and fresh["git"].notna().any() else "unknown"
    peak, parameters = peak_tflops(device, peak_given), base_parameters(run)
    lines = [f"## The {cfg.preset} run, from its own records", "",
             f"`{command}` on {datetime.date.today().isoformat()}, reading `{shown(run)}`: a run of code {code} on "
             + (f"{device}." if device != "unknown"
                else "a device it did not record (made before manifests noted it).")]
    if not nbs.empty:
        span, total = nbs["end"].max() - nbs["start"].min(), nbs["seconds"].sum()
        when = lambda t: f"{datetime.datetime.fromtimestamp(t, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"  # noqa: E731
        # ./run_all.sh runs the notebooks back to back, each after its kernel starts (~10 s on 2 busy cores);
        # a longer span means they come from several runs
        lines += [f"The executed notebooks: {len(nbs)}, {total / 60:.1f} min of notebook wall time in all, "
                  + (f"run back to back from {when(nbs['start'].min())} ({span / 60:.1f} min)"
                     if span < total + 30 * len(nbs) else f"from several runs between {when(nbs['start'].min())} and "
                     f"{when(nbs['end'].max())}") + ("; a notebook failed" if nbs["failed"].any() else "") + ".", "",
                  "| notebook | wall (s) | started (UTC) |", "|---|---:|---|"]
        lines += [f"| {r.notebook} | {r.seconds:.1f} | {when(r.start)[11:16]} |" for r in nbs.itertuples()]
    reused = sorted(done.loc[~timed_here(done, nbs), "dir"])
    if reused:
        lines += ["", f"Reused from an earlier run, so not timed here: {', '.join(reused[:8])}"
                  + (f" and {len(reused) - 8} more" if len(reused) > 8 else "") + "."]

    sft = fresh[fresh["stage"].eq("sft") & fresh["train_tokens"].notna()]
    if not sft.empty:
        s = sft_row(sft.iloc[0], parameters, peak)
        mfu = "—" if s["mfu"] is None else f"{s['mfu']:.1%}"
        lines += ["", "SFT (trained tokens: every non-padding token; training time leaves out Figure 2's loss "
                  "evaluations, keeps the checkpoint saves):", "",
                  "| steps | processes | trained tokens | training (s) | stage (s) | tokens/s | model TFLOP/s | MFU |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {s['steps']} | {s['processes']} | {s['tokens']:,} | {fmt(s['train_s'])} | {fmt(s['stage_s'])} | "
                  f"{fmt(s['tokens_per_s'], 0)} | {fmt(s['tflops'], 2)} | {mfu} |"]
    metrics_path = artifacts.rl_dir(cfg) / "metrics.csv"
    if metrics_path.is_file() and fresh["stage"].eq("rl").any():  # metrics.csv of a reused run is not this one's
        p = ppo_row(pd.read_csv(metrics_path))
        lines += ["", f"PPO ({p['updates']} updates; means over the {p['averaged']} after the first):", "",
                  "| attempts/update | rollout tokens/s | generation s/update | optimisation s/update | s/update |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {fmt(p['attempts'], 0)} | {fmt(p['rollout_tokens_per_s'], 0)} | {fmt(p['rollout_s'], 2)} | "
                  f"{fmt(p['optimisation_s'], 2)} | {fmt(p['update_s'], 2)} |"]
    evals = fresh[fresh["stage"].eq("eval") & fresh["episodes"].notna()]
    if not evals.empty:
        rate = evals["episodes"] / evals["seconds"]
        # Figure 1's checkpoints one by one; the restored ones (notebooks 06, 07) in one row
        named = evals["dir"].str.fullmatch(r"eval/(base|sft-\d+|rl-\d+)")
        rows = [(Path(r.dir).name, r.episodes, r.attempts, r.seconds)
                for r in evals[named].sort_values("finished").itertuples()]
        if (~named).any():
            other = evals[~named]
            rows.append((f"{len(other)} restored (medians)", other["episodes"].median(), other["attempts"].median(),
                         other["seconds"].median()))
        lines += ["", f"Evaluation ({len(evals)} checkpoints, all episodes of one in batches of "
                  f"{cfg.eval.batch_size}): median {statistics.median(evals['seconds']):.1f} s and "
                  f"{statistics.median(rate):.1f} episodes/s "
                  "a checkpoint.", "",
                  "| checkpoint | episodes | attempts | seconds | episodes/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {episodes:.0f} | {attempts:.0f} | {seconds:.1f} | {episodes / seconds:.1f} |"
                  for name, episodes, attempts, seconds in rows]
    for stage, what in (("spectra", "Spectra (every pair of notebook 05, filling the SVD cache)"),
                        ("restore", "Restored checkpoints written")):
        rows = fresh[fresh["stage"].eq(stage) & fresh["seconds"].notna()]
        if not rows.empty:
            each = "" if len(rows) == 1 else f"{len(rows)} × median {statistics.median(rows['seconds']):.1f} s, "
            lines += ["", f"{what}: {each}{rows['seconds'].sum():.1f} s in all, on {rows['device'].iloc[0]}."]
    if spectra_rows:
        lines += ["", "One spectra pair afresh (no SVD cache), by device:", "",
                  "| on | device | matrices | seconds |", "|---|---|---:|---:|"]
        lines += [f"| {r['on']} | {r['device']} | {r['matrices']} | {r['seconds']:.1f} |" for r in spectra_rows]
    lines += ["", "MFU: 6·N FLOPs per trained token, N = "
              + (f"{parameters:,} parameters" if parameters else "unknown (no runs/<preset>/models/base here)")
              + ", over " + (f"{peak:g} TFLOP/s (dense bf16 peak)." if peak
                             else "no known peak (a CPU, or give --peak-tflops).")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known by the GPU's name)")
    p.add_argument("--spectra-pair", nargs=2, metavar=("BEFORE", "AFTER"), help="two checkpoint dirs to time afresh")
    p.add_argument("--spectra-on", default="cpu", help="comma-separated device[:svd driver] for --spectra-pair")
    p.add_argument("--write-docs", action="store_true", help="record the result in docs/benchmarks.md")
    args = p.parse_args()
    cfg = config.load(args.preset)
    spectra_rows = (time_spectra(args.spectra_pair, args.spectra_on.split(","), cfg.spectra.k)
                    if args.spectra_pair else [])
    command = "python benchmarks/bench_run.py " + " ".join(sys.argv[1:])
    body = report(cfg, args.peak_tflops, spectra_rows, command)
    print(body)
    if args.write_docs:
        write_section(f"bench_run_{cfg.preset}", body)


if __name__ == "__main__":
    main()
