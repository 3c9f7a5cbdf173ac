"""Where every artifact lives, and the manifests that let a stage skip work it has already done.

All stages read and write under runs/<preset>/ (override the root with PAPER_RUNS_DIR); nothing passes
between notebooks in memory. A stage's manifest records its config slice, input hashes and the hash of
the code it ran; `cached_stage` rebuilds only when that spec changes (or `force=True`), and builds into
a temporary directory that replaces the old one only when complete, so an interrupted run leaves no
half-written artifact behind.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import PROJECT_ROOT, Config

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as the stages name it: an evaluation label, the stage that made it, its step, its directory."""

    label: str  # "base", "sft-0120", "rl-0003", or a user's label
    stage: str  # base, sft, rl or other
    step: int
    path: Path


def runs_root() -> Path:
    return Path(os.environ.get("PAPER_RUNS_DIR", PROJECT_ROOT / "runs"))


def run_dir(cfg: Config) -> Path:
    return runs_root() / cfg.preset


def data_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "data"


def base_model_dir(cfg: Config) -> Path:
    """The local copy of a preset's base model (built for tiny, converted from GGUF for smol)."""
    return run_dir(cfg) / "models" / "base"


def sft_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "sft"


def rl_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "rl"


def eval_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "eval"


def spectra_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "spectra"


def restore_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "restore"


def numbered_checkpoints(directory: Path) -> dict[int, Path]:
    """{step: path} of the loadable `checkpoint-<step>` directories (config.json and weights present)."""
    found = {}
    for path in Path(directory).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            found[int(step)] = path
    return dict(sorted(found.items()))


def full_sft_step(cfg: Config, steps) -> int:
    """The full-SFT step among saved `steps`: sft.full_sft_step if saved, else the last one. The one rule
    for RL's start, the evaluation's "full SFT" and sft.checkpoint("full_sft")."""
    steps = sorted(steps)
    if not steps:
        raise ValueError("no SFT checkpoint saved yet")
    return cfg.sft.full_sft_step if cfg.sft.full_sft_step in steps else steps[-1]


def figures_dir(cfg: Config) -> Path:
    return Path(os.environ.get("PAPER_FIGURES_DIR", PROJECT_ROOT / "figures")) / cfg.preset


def imported_modules(module: str, package_dir: str | os.PathLike | None = None) -> list[str]:
    """`module` and every paper_lib module it imports, directly or through others (any import statement,
    also one inside a function), sorted. Read from the source with `ast`, so nothing is executed."""
    package_dir = Path(package_dir or PROJECT_ROOT / "paper_lib")
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((package_dir / f"{name}.py").read_text(), filename=f"{name}.py")
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
                found = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paper_lib"):
                rest = node.module.removeprefix("paper_lib").lstrip(".")
                found = [rest] if rest else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".")[1] for a in node.names if a.name.startswith("paper_lib.")]
            todo += [f.split(".")[0] for f in found if (package_dir / f"{f.split('.')[0]}.py").is_file()]
    return sorted(seen)


def code_hash(*modules: str, package_dir: str | os.PathLike | None = None) -> str:
    """A stage's code version: the hash of the source of the named paper_lib modules and of every
    paper_lib module they import. Derived from the imports, never from a list kept by hand, so editing
    cards.py invalidates every stage that plays the game, and editing a plot invalidates none."""
    package_dir = Path(package_dir or PROJECT_ROOT / "paper_lib")
    names = sorted({m for module in modules for m in imported_modules(module, package_dir)})
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (package_dir / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def stage_key(out_dir: str | os.PathLike) -> str:
    """Identity of a finished stage for the stages that read it: the hash of its manifest without the
    provenance (time, git). A rebuilt input with other settings or code changes its readers' keys."""
    found = read_manifest(out_dir)
    if found is None:
        raise FileNotFoundError(f"{out_dir} holds no finished stage (no {MANIFEST})")
    found.pop("provenance", None)
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(checkpoint: str | os.PathLike) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and mtimes of its weight files."""
    path = Path(checkpoint)
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {path}")
    blob = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_version() -> str:
    """`git describe --always --dirty` of the project, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def manifest_matches(out_dir: str | os.PathLike, spec: dict[str, Any]) -> bool:
    """True when out_dir holds a finished stage whose manifest agrees with every key of spec."""
    found = read_manifest(out_dir)
    if found is None:
        return False
    canon = json.loads(json.dumps(spec, sort_keys=True, default=str))
    return all(found.get(key) == value for key, value in canon.items())


def write_manifest(out_dir: str | os.PathLike, spec: dict[str, Any], **provenance: Any) -> None:
    record = {**json.loads(json.dumps(spec, sort_keys=True, default=str)), "provenance": {
        "git": git_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance}}
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def cached_stage(out_dir: str | os.PathLike, spec: dict[str, Any], build: Callable[[Path], Any],
                 force: bool = False) -> Path:
    """Run `build(tmp_dir)` unless out_dir already holds a stage with this spec; return out_dir."""
    out_dir = Path(out_dir)
    if not force and manifest_matches(out_dir, spec):
        log.info("%s is up to date (manifest matches); pass force=True to rebuild", out_dir)
        return out_dir
    started = time.time()
    with atomic_dir(out_dir) as tmp:
        build(tmp)
        write_manifest(tmp, spec, seconds=round(time.time() - started, 2))
    return out_dir
