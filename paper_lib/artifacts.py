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
import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .config import PROJECT_ROOT, Config

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as the stages name it: an evaluation label, the stage that made it, its step, its directory."""

    label: str  # "base", "sft-0120", "rl-0003", or a user's label
    stage: str  # base, sft, rl, restore, or other (evaluate.OWN_STAGE: a checkpoint given on the command line)
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


RESULTS, RESTORE_RESULTS, CAUSAL_RESULTS = "results", "restore_results", "causal_results"  # eval tables, by notebook


def eval_table(cfg: Config, name: str = RESULTS) -> Path:
    """runs/<preset>/eval/<name>.parquet, a table of success rates: RESULTS (04_eval's checkpoints),
    RESTORE_RESULTS (06_restore's restored ones), CAUSAL_RESULTS (07_causal's)."""
    return eval_dir(cfg) / f"{name}.parquet"


def recovery_table(cfg: Config) -> Path:
    """runs/<preset>/eval/recovery.csv: 04_eval's headline quantities, per rule."""
    return eval_dir(cfg) / "recovery.csv"


def variants_table(cfg: Config) -> Path:
    """runs/<preset>/restore/variants.csv: 06_restore's variants, evaluated, with the share each recovers."""
    return restore_dir(cfg) / "variants.csv"


def trainer_state(checkpoint: Path) -> dict | None:
    """A Trainer checkpoint's trainer_state.json, or None if it is missing or cut short. The Trainer writes
    it last, but opens it before it writes it, so a kill at that moment leaves an empty file."""
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def has_weights(path: Path) -> bool:
    """A loadable Hugging Face model directory: config.json and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def numbered_checkpoints(directory: Path) -> dict[int, Path]:
    """{step: path} of the loadable `checkpoint-<step>` directories (config.json and weights present)."""
    found = {}
    for path in Path(directory).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and has_weights(path):
            found[int(step)] = path
    return dict(sorted(found.items()))


def full_sft_step(cfg: Config, steps) -> int:
    """The full-SFT step among saved `steps`: sft.full_sft_step if saved, else the last one. The one rule
    for RL's start, the evaluation's "full SFT" and sft.checkpoint("full_sft")."""
    steps = sorted(steps)
    if not steps:
        raise ValueError("no SFT checkpoint saved yet")
    return cfg.sft.full_sft_step if cfg.sft.full_sft_step in steps else steps[-1]


def evaluated_sft_steps(cfg: Config, steps) -> list[int]:
    """The SFT steps among saved `steps` that the sweep (Figure 1) evaluates: multiples of eval.sft_every
    (all when 0), with sft.inter_sft_step, sft.full_sft_step and the last always kept (Figure 1's marks and
    RL's start)."""
    steps = sorted(steps)
    every = cfg.eval.sft_every
    if every == 0 or not steps:
        return steps
    keep = {cfg.sft.inter_sft_step, cfg.sft.full_sft_step, steps[-1]}
    return [s for s in steps if s % every == 0 or s in keep]


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
    """`git describe --always --dirty` of the project; outside a checkout, $PAPER_CODE_VERSION (a copy of
    the tree without .git, as on the GPU machine, names its commit so), else "unknown"."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
        found = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get("PAPER_CODE_VERSION") or "unknown"


def file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (e.g. truncated by a killed run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    found = read_json(Path(out_dir) / MANIFEST)
    return found if isinstance(found, dict) else None


def up_to_date(out_dir: str | os.PathLike, spec: dict[str, Any], rebuild: str) -> bool:
    """manifest_matches, and the finished outputs are intact: every *.safetensors under out_dir has a
    readable header and the size it describes (headers only, so cheap). A damaged output raises
    ArtifactError naming the file and `rebuild`, the way to remake it, rather than being trusted."""
    if not manifest_matches(out_dir, spec):
        return False
    for path in sorted(Path(out_dir).rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ArtifactError(f"{path}: {problem}; {rebuild}")
    return True


def manifest_matches(out_dir: str | os.PathLike, spec: dict[str, Any]) -> bool:
    """True when out_dir holds a finished stage whose manifest agrees with every key of spec."""
    found = read_manifest(out_dir)
    if found is None:
        return False
    canon = json.loads(json.dumps(spec, sort_keys=True, default=str))
    return all(found.get(key) == value for key, value in canon.items())


def spec_changes(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 4) -> str:
    """What differs between an earlier stage's spec and this one, for the log line that says why a stage is
    redone: "sft.learning_rate 0.01 -> 0.002, code" (a long value, such as a hash, by its key alone)."""
    if not isinstance(old, dict):
        return "no readable record of its settings"

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix.rstrip("."): tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    def settings(spec: dict[str, Any]) -> dict[str, Any]:
        return flat({k: v for k, v in json.loads(json.dumps(spec, default=str)).items() if k != "provenance"})

    before, after = settings(old), settings(new)
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if not changed:
        return "the same settings"
    words = []
    for key in changed[:limit]:
        a, b = json.dumps(before.get(key)), json.dumps(after.get(key))
        words.append(f"{key} {a} -> {b}" if max(len(a), len(b)) <= 14 else key)  # a hash or path: its key
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(words) + more


def portable_path(path: str | os.PathLike) -> str:
    """A checkpoint's path as a spec records it: relative to the runs root when it lies there, so that a
    runs/ copied or moved whole (cp -a, rsync -a, tar keep the mtimes `fingerprint` reads) is still up to
    date; absolute otherwise."""
    real, root = Path(path).resolve(), runs_root().resolve()
    return f"<runs>/{real.relative_to(root)}" if real.is_relative_to(root) else str(real)


def read_table(path: str | os.PathLike, remake: str) -> pd.DataFrame:
    """A table a stage wrote (.parquet, .csv or .jsonl), or one line naming the file and `remake`, the way to
    write it again, when it is missing or unreadable (truncated, damaged) instead of a reader's traceback."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: {remake}")
    if path.suffix in (".csv", ".jsonl") and not _ends_a_line(path):  # pandas would read the half row as data
        raise ArtifactError(f"{path} ends in the middle of a row (cut short?); {remake}")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_csv(path)
    except Exception as err:  # pyarrow, pandas and json each raise their own kinds for a damaged file
        raise ArtifactError(f"{path} is unreadable ({err.__class__.__name__}: {str(err).strip()[:120]}); "
                            f"{remake}") from None


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def write_table(table: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> Path:
    """Write a stage's table (.parquet, else CSV) in one step (atomic_file): a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=index)
        else:
            table.to_csv(tmp, index=index)
    return path


def write_manifest(out_dir: str | os.PathLike, spec: dict[str, Any], **provenance: Any) -> None:
    """The finished stage's record: spec, plus a provenance (git, time, device, and what the stage adds, such
    as its seconds) that stage_key leaves out, so a rerun on other hardware does not invalidate readers."""
    record = {**json.loads(json.dumps(spec, sort_keys=True, default=str)), "provenance": {
        "git": git_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device_in_use(),
        **provenance}}
    with atomic_file(Path(out_dir) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))


def device_in_use(device: str | None = None) -> str:
    """What a stage computed on, in words: the GPU's name where torch has CUDA (or `device` says "cuda"),
    else the CPU's cores. A stage that never imported torch ran on the CPU."""
    torch = sys.modules.get("torch")
    on_gpu = torch is not None and torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if on_gpu:
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux, macOS
    return f"CPU ({cores} cores)"


def is_leftover(name: str) -> bool:
    """Whether a file or folder name is one this project gives to what is not a finished result: a run
    moved aside (<name>.stale-<time>) or the scratch of an atomic write or build (<name>.tmp-<pid>,
    .<name>.partial, .<name>.partial-<pid>). Readers of a run (benchmarks, the GPU archive) skip them."""
    return ".stale-" in name or ".tmp-" in name or ".partial" in name


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` in one step, so a reader
    never sees half a file and an interrupted write leaves the previous one. The temporary name ends in
    `.tmp-<pid>`, so no `*.parquet`-style glob picks up a leftover."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def replace_dir(finished: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory `finished` to `final`, whose previous contents (the caller checked they
    are its own output) go only once the new ones are in place: never a moment with neither."""
    finished, final = Path(finished), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(finished, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`, which must be
    absent, empty or the project's own output (a manifest in it): a user's directory is never replaced."""
    final = Path(final)
    if not is_own_output(final):
        raise ArtifactError(f"{final} exists and was not written by this project (no {MANIFEST}); "
                            f"move it away, nothing was changed")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def read_cached(out_dir: str | os.PathLike, spec: dict[str, Any], read: Callable[[Path], Any], redo: str,
                force: bool = False, damaged: tuple[type[Exception], ...] = ()) -> Any:
    """read(out_dir) when it holds a finished stage of `spec` that reads back, else None after one line on why
    the caller redoes it (`redo`, e.g. "evaluating sft-0016 again"): the settings that changed, or the cached
    file that is damaged (ArtifactError, or a `damaged` kind the reader raises): a cache is computed again."""
    out_dir = Path(out_dir)
    if not force and manifest_matches(out_dir, spec):
        try:
            return read(out_dir)
        except (ArtifactError, *damaged) as err:
            log.warning("%s; %s", str(err).split("; ")[0], redo)  # the file and its fault, not the reader's fix
    elif not force and out_dir.exists():
        log.info("%s: %s", redo, spec_changes(read_manifest(out_dir), spec))
    return None


def cached_stage(out_dir: str | os.PathLike, spec: dict[str, Any], build: Callable[[Path], Any],
                 force: bool = False) -> Path:
    """Run `build(tmp_dir)` unless out_dir already holds a stage with this spec; return out_dir."""
    out_dir = Path(out_dir)
    if not force and up_to_date(out_dir, spec, f"move {out_dir} aside (or delete it) and rerun: it is rebuilt"):
        log.info("%s is up to date (manifest matches); pass force=True to rebuild", out_dir)
        return out_dir
    earlier = read_manifest(out_dir)
    if earlier is not None:  # a warning, so that a notebook shows it: it may undo another notebook's override
        log.warning("rebuilding %s for these settings (%s)", out_dir, "force" if force else spec_changes(earlier, spec))
    started = time.time()
    with atomic_dir(out_dir) as tmp:
        build(tmp)
        write_manifest(tmp, spec, seconds=round(time.time() - started, 2))
    return out_dir


# ------------------------------------------------------------------ never delete what the user did not ask to
class ArtifactError(ValueError):
    """An input checkpoint is damaged, or an output path is not the project's to replace."""


_OWN_MARKERS = (MANIFEST, "run_spec.json", "restore_manifest.json")  # files only the project's stages write


def check_out_apart(out: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Refuse an output directory that is a file, or is, lies inside or contains an input checkpoint:
    writing there would change the input, and replacing it would delete it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file; choose a new directory")
    real = out.resolve()
    for path in inputs:
        p = Path(path).resolve()
        if p == real or p in real.parents or real in p.parents:
            raise ArtifactError(f"--out {out} is, lies inside or contains the input {path}; choose a new "
                                f"directory")


def is_own_output(path: str | os.PathLike) -> bool:
    """True when `path` is absent, an empty directory, or a directory one of the project's stages wrote
    (recognised by its manifest): only such a path may be replaced or moved aside."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    return not any(path.iterdir()) or any((path / marker).is_file() for marker in _OWN_MARKERS)


def move_aside(path: str | os.PathLike, reason: str, keep: tuple[str, ...] = (), quiet: bool = False) -> Path | None:
    """Rename a previous run `path` to `<name>.stale-<time>` beside it (never delete it), log why (a warning;
    quiet: a note, for a small cache), and return the new path (None when there was nothing to move).
    Entries named in `keep` (e.g. a log a running process appends to) stay where they are."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.stale-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.stale-{stamp}-{n}"), n + 1
    if keep:
        aside.mkdir()
        for child in path.iterdir():
            if child.name not in keep:
                os.replace(child, aside / child.name)
    else:
        os.replace(path, aside)
    (log.info if quiet else log.warning)("moved the previous run %s aside to %s (%s); delete it yourself when "
                                         "it is not needed", path, aside, reason)
    return aside


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is unreadable (bad header, or shorter/longer than its header says), or None.

    Reads only the header, so it costs microseconds even for a 5 GB shard."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"header claims {n} bytes but the file has {size}"
            header = json.loads(fh.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"unreadable safetensors header ({err.__class__.__name__})"
    if 8 + n + end != size:
        return f"{size} bytes, but its header describes {8 + n + end} (truncated or damaged)"
    return None


def validate_checkpoint(path: str | os.PathLike, rebuild: str = "") -> Path:
    """Check a checkpoint's weights before anything is built from it: the index JSON parses and names
    files that exist, every *.safetensors header is readable and the file size agrees with it. Raises
    ArtifactError naming the bad file (and `rebuild`, the command that remakes it)."""
    path = Path(path)
    rebuild_hint = f"; rebuild it with: {rebuild}" if rebuild else ""
    hint = rebuild_hint or "; replace it with an intact copy"
    # a typo, a file or the wrong folder is not damage: no intact copy to fetch, the path is wrong
    wrong_path = rebuild_hint or "; pass the directory that save_pretrained wrote (config.json and the weights)"
    if not path.is_dir():
        problem = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        raise ArtifactError(f"{path} {problem}{wrong_path}")
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{index} is not a valid safetensors index (truncated?){hint}") from None
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            raise ArtifactError(f"{path} lacks the shard(s) {missing[:3]} its index names{hint}")
    if not shards and not any(path.glob("*.bin")):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ArtifactError(f"no weight files (*.safetensors) in {path} (it holds {found}){wrong_path}")
    for shard in shards:
        problem = safetensors_problem(shard)
        if problem:
            raise ArtifactError(f"{shard}: {problem}{hint}")
    return path


_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def safe_name(name: str, what: str = "label") -> str:
    """`name` when it is one plain path component (letters, digits, - _ .; not . or ..), else ArtifactError."""
    if not name or name in (".", "..") or not set(name) <= _LABEL_CHARS:
        raise ArtifactError(f"{what} {name!r} must be a single name of letters, digits, '-', '_' and '.' "
                            f"(not '.' or '..')")
    return name


# ------------------------------------------------------------------------- a training stage's directory
RUN_SPEC = "run_spec.json"  # the spec of the run a training directory holds, written before it starts


def prepare_run_dir(out: str | os.PathLike, spec: dict[str, Any], force: bool, what: str) -> None:
    """Make `out` ready to train `spec` (on the main process): forced, it is emptied (the user asked);
    holding a run of another spec, it is moved aside whole (never deleted); holding this spec (an
    interrupted run), it is kept for resuming, less the scratch a killed save left. The manifest goes
    (the finished run writes it again) and the run spec is written."""
    out = Path(out)
    canon = json.loads(json.dumps(spec, sort_keys=True, default=str))
    if force and out.exists():
        log.info("starting %s afresh (force)", out)
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and (earlier := read_json(out / RUN_SPEC)) != canon:
        move_aside(out, f"it holds {what} of other settings, code or inputs: {spec_changes(earlier, canon)}")
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".checkpoint-*"):  # our own scratch names, left by a run killed while saving
        shutil.rmtree(partial, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)
    (out / RUN_SPEC).write_text(json.dumps(canon, indent=2, sort_keys=True))


def reuse_earlier_run(out: str | os.PathLike, spec: dict[str, Any], rebuild: str, quiet: bool = False) -> bool:
    """Put back a finished run of `spec` that an earlier change of settings moved aside (`<out>.stale-*`,
    newest first), moving the run now in `out` aside in its place: going back to settings already trained
    costs a rename, not the run. False, touching nothing, when no such run is intact. Main process only.
    quiet logs notes rather than warnings (a small cache, one of many)."""
    out = Path(out)
    for earlier in sorted(out.parent.glob(f"{out.name}.stale-*"), reverse=True):  # <time> sorts as it reads
        try:
            if not (earlier.is_dir() and up_to_date(earlier, spec, rebuild)):
                continue
        except ArtifactError as err:  # a damaged earlier run is not reused, and stays where it is
            log.info("not reusing %s: %s", earlier, err)
            continue
        if out.exists() and any(out.iterdir()):
            move_aside(out, f"a finished run of these settings was kept in {earlier.name}", quiet=quiet)
        elif out.exists():
            out.rmdir()  # empty: nothing to keep
        os.replace(earlier, out)
        (log.info if quiet else log.warning)("reusing %s, finished earlier with these settings, as %s (moved "
                                             "back; not computed again)", earlier.name, out)
        return True
    return False


def finished_run(out: str | os.PathLike, spec: dict[str, Any], rebuild: str, force: bool = False) -> bool:
    """Whether a training stage (SFT, RL) need not run: `out` holds a finished run of `spec`, or an earlier
    one moved aside is moved back (reuse_earlier_run). force: never. Main process only."""
    if force:
        return False
    if up_to_date(out, spec, rebuild):
        log.info("%s is up to date (manifest matches); pass force=True to redo it", out)
        return True
    return reuse_earlier_run(out, spec, rebuild)


def keep_earlier_result(out: str | os.PathLike, spec: dict[str, Any], redo: str, force: bool = False) -> None:
    """Before a cache of `spec` at `out` is read (main process only): a finished result of other settings
    there is moved aside (<out>.stale-<time>) rather than overwritten by the new one, and a result of these
    settings moved aside earlier is moved back (reuse_earlier_run; not with force), so that going back to
    earlier settings reads their results instead of computing them again. `redo` says what is computed
    again, for the note on what changed."""
    out = Path(out)
    earlier = read_manifest(out)
    if earlier is None or manifest_matches(out, spec):
        return  # nothing finished there (atomic_dir guards a user's directory), or these settings' result
    if not force and reuse_earlier_run(out, spec, redo, quiet=True):
        return
    log.info("%s: %s", redo, spec_changes(earlier, spec))
    move_aside(out, "its settings changed", quiet=True)


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV table (its header from the first row when the file is new). A table an older
    version began, without a column these rows have, is first widened (its rows blank there), so a resumed
    run's values never land under another column's name."""
    path = Path(path)
    if not rows:
        return
    new = not path.is_file() or path.stat().st_size == 0  # empty: a run killed before its first rows landed
    fields = list(rows[0])
    if not new:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            added = [k for k in fields if k not in header]
            old = list(reader) if added else []
        fields = header + added
        if added:
            with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:  # a kill here leaves the old table
                writer = csv.DictWriter(fh, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(old)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def keep_rows(path: str | os.PathLike, column: str, last: int) -> None:
    """Drop the rows of a CSV table whose `column` is past `last`: what a killed run logged after its last
    checkpoint is redone when it resumes."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if int(r[column]) <= last]
        fields = reader.fieldnames
    if fields is None:  # an empty table: nothing to drop, and append_rows gives it its header
        return
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:  # a kill here leaves the old table whole
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
