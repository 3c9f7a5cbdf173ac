"""Where every artifact lives, and the manifests that let a stage skip work it has already done.

All stages read and write under runs/<preset>/ (override the root with PAPER_RUNS_DIR); nothing passes
between notebooks in memory. A stage's manifest records its config slice, input hashes and the hash of
the code it ran; `cached_stage` rebuilds only when that spec changes (or `force=True`), and builds into
a temporary directory that replaces the old one only when complete, so an interrupted run leaves no
half-written artifact behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import PROJECT_ROOT, Config

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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


def notebooks_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "notebooks"


def numbered_checkpoints(directory: Path) -> dict[int, Path]:
    """{step: path} of the loadable `checkpoint-<step>` directories (config.json and weights present)."""
    found = {}
    for path in Path(directory).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            found[int(step)] = path
    return dict(sorted(found.items()))


def figures_dir(cfg: Config) -> Path:
    return Path(os.environ.get("PAPER_FIGURES_DIR", PROJECT_ROOT / "figures")) / cfg.preset


def code_hash(*modules: str) -> str:
    """Hash of the source of the named paper_lib modules (e.g. "cards", "data"): a stage's code version.

    Only the code a stage runs counts, so editing a plot does not invalidate an SFT run.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update((PROJECT_ROOT / "paper_lib" / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


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
