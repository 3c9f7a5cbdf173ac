"""Pack a run's results for the trip back from the GPU machine: figures, tables, manifests, executed notebooks
and logs, never weights. One .tar.gz, split into parts where it passes one file's limit of the device tool.

    python scripts/pack_results.py SESSION_DIR PRESET OUT_DIR [--label final] [--max-mib 15]

SESSION_DIR holds runs/<PRESET>/, figures/<PRESET>/ and the session's own files (benchmarks.md, *.log,
*.txt), as scripts/gpu_session.sh lays them out. The archive's paths are relative to SESSION_DIR.
Unpack with `cat results.tar.gz* | tar xz`.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import sys
import tarfile
from pathlib import Path

from paper_lib import artifacts

TABLES = {".json", ".csv", ".parquet", ".jsonl", ".log", ".ipynb", ".md", ".txt"}
SKIP_DIRS = {"data", "trainer_state"}  # inputs and resume state: of these only the manifests travel


def is_checkpoint(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json"))


def selected(session: Path, preset: str) -> list[Path]:
    """The files to bring back, relative to `session`: every file of figures/<preset>/ and of the session's
    top level; under runs/<preset>/ the tables, manifests, notebooks and logs, but of a checkpoint, the data
    and a resume state only the manifest, and nothing of a stale run, a scratch file or the SVD cache."""
    files = [p for p in session.glob("*") if p.is_file() and p.suffix in TABLES]
    files += [p for p in (session / "figures" / preset).rglob("*") if p.is_file()]
    run = session / "runs" / preset
    for path in sorted(run.rglob("*")) if run.is_dir() else []:
        parts = path.relative_to(run).parts
        if not path.is_file() or path.suffix not in TABLES or "svd_cache" in parts:
            continue
        if any(artifacts.is_leftover(p) for p in parts):
            continue
        if path.name == "manifest.json" or not (is_checkpoint(path.parent) or SKIP_DIRS & set(parts[:-1])):
            files.append(path)
    return sorted({f.relative_to(session) for f in files})


def pack(session: Path, preset: str, out: Path, label: str = "final", max_mib: float = 15) -> list[Path]:
    """Write OUT/results.tar.gz (or results.tar.gz.part-0, -1, ... each ≤ max_mib) and OUT/label; return the
    archive's files. Earlier archives in OUT are replaced."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for rel in selected(session, preset):
            tar.add(session / rel, arcname=str(rel))
    data, limit = buffer.getvalue(), int(max_mib * 1024 * 1024)
    if len(data) <= limit:
        parts = {"results.tar.gz": data}
    else:
        parts = {f"results.tar.gz.part-{i}": data[start:start + limit]
                 for i, start in enumerate(range(0, len(data), limit))}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # the driver and a `collect` call may pack at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in out.glob("results.tar.gz*"):
            old.unlink()
        for name, chunk in {**parts, "label": (label + "\n").encode()}.items():
            (out / f".{name}.tmp").write_bytes(chunk)
            (out / f".{name}.tmp").replace(out / name)
    return [out / name for name in parts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("session", type=Path)
    p.add_argument("preset")
    p.add_argument("out", type=Path)
    p.add_argument("--label", default="final", help="what the archive holds (final, partial)")
    p.add_argument("--max-mib", type=float, default=15, help="the largest file to write (the device tool: 16 MiB)")
    args = p.parse_args(argv)
    if not (args.session / "runs" / args.preset).is_dir():
        print(f"pack_results: {args.session}/runs/{args.preset} does not exist: nothing to pack", file=sys.stderr)
        return 2
    written = pack(args.session, args.preset, args.out, args.label, args.max_mib)
    total = sum(p.stat().st_size for p in written)
    print(f"packed ({args.label}): {total / 2**20:.1f} MiB in {len(written)} file(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
