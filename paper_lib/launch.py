"""The one way to run a stage in processes of its own (SFT, RL, evaluation on several GPUs) from a notebook or
a script, and the conventions of every `python -m paper_lib.X`.

`run_stage` starts `python -m paper_lib.<module> --preset P --override section.key=value ...` (behind
`accelerate launch` when the stage's accelerate config or process count asks for it), appends its output
to runs/<preset>/logs/<module>.log and echoes it as it comes; an interrupt (a notebook's stop button)
stops the whole process group it started; a failure is a StageError with the command, the log and its
last lines. Inside the child, `process_state` is how every stage sees its processes.
"""
from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from . import artifacts
from . import config as config_lib
from .config import ACCELERATE_DIR, PROJECT_ROOT, Config, ConfigError

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A training stage failed in its subprocess; the message holds its command, exit code, log and last lines."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tail(text: str, lines: int) -> str:
    """The last `lines` non-empty lines of terminal output, colour codes and progress-bar redraws removed."""
    text = _ANSI.sub("", text).replace("\r\n", "\n")
    rows = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in text.split("\n")]
    return "\n".join([r for r in rows if r.strip()][-lines:])


def run_streamed(cmd: list[str], log_path: Path, stream: bool = True, append: bool = True) -> tuple[int, str]:
    """Run cmd from the project root; append (or write) its output to log_path and echo it. Returns the exit
    code and the last part of the output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    recent: deque[str] = deque(maxlen=200)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w", encoding="utf-8") as log_file:
        log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fd, pending, shown = proc.stdout.fileno(), "", time.monotonic()
        try:
            while True:
                ready = select.select([fd], [], [], 0.5)[0]
                chunk = os.read(fd, 1 << 14) if ready else None
                if chunk is not None:
                    text = decoder.decode(chunk, final=not chunk)
                    log_file.write(text)
                    log_file.flush()
                    recent.append(text)
                    pending += text
                # echo a finished log line at once, progress-bar redraws at most twice a second
                if stream and pending and (not chunk or "\n" in pending or time.monotonic() - shown > 0.5):
                    sys.stdout.write(pending)
                    sys.stdout.flush()
                    pending, shown = "", time.monotonic()
                if chunk == b"":
                    break
            code = proc.wait()
        except BaseException:  # interrupted (e.g. a notebook's stop button): stop the run we started
            stop(proc)
            raise
        finally:
            proc.stdout.close()
    return code, "".join(recent)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it has not gone within 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_main(work: Callable[[], str]) -> int:
    """The convention of every `python -m paper_lib.X`: run `work`, print the line it returns and exit 0;
    under several processes only rank 0 prints it, so the line appears once in the log. An error of the
    user's settings, input or files (ValueError: ConfigError, WeightsError, ArtifactError...; OSError: a
    missing or unwritable file, ModelUnavailableError) is one line on stderr and exit 2, no traceback;
    anything else is a bug and keeps its traceback. Ctrl-C is one line and exit 130: every stage writes
    through a scratch name, so what it had finished is kept and a rerun reuses it (spectra and restore
    keep their decompositions only in a --cache directory)."""
    try:
        message = work()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left. Rerun the same command: what had finished is reused "
              "(checkpoints and evaluated checkpoints; with --cache, spectra's and restore's decompositions)",
              file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # set by torchrun / accelerate launch
        print(message)
    return 0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings into config.load overrides; values are read as YAML (1e-3, true, [1, 2])."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--override needs section.key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def use_cpu() -> bool:
    """Whether accelerate should run on the CPU: asked for (ACCELERATE_USE_CPU, `accelerate launch --cpu`) or
    no CUDA. Without cpu=True, a torchrun launch on a machine without CUDA comes up as ONE process
    (PartialState() then ignores WORLD_SIZE), which is how a two-process CPU run silently became one."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's shared process state, made the way every stage (and Trainer, Accelerator) must see it."""
    from accelerate import PartialState

    die_with_launcher()
    return PartialState(cpu=use_cpu())


def die_with_launcher() -> None:
    """Under torchrun (accelerate launch with several processes) each rank runs in a session of its own, so a
    SIGKILL of the launcher's process group leaves the ranks training and writing on; ask Linux to SIGKILL
    this rank when its launcher dies (prctl PR_SET_PDEATHSIG), as a kill of the whole run means."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGKILL)


def report_processes(stage: str, state: Any, share: str) -> None:
    """One line per process, on every rank (non-main loggers are quietened): the world size this process
    saw and its share of the work. The multi-process tests read these lines, so a launch that fell back
    to one process shows as one line with `world size 1`, not as a silent success."""
    line = f"\n[{stage}] rank {state.process_index} of world size {state.num_processes}: {share}\n"
    sys.stderr.flush()
    os.write(2, line.encode())  # one write, under PIPE_BUF: the ranks' lines cannot interleave in a shared pipe


# ------------------------------------------------------------------------------------- the stage runner
def config_overrides(cfg: Config) -> dict[str, Any]:
    """The `section.key` settings in which cfg differs from its preset file, to pass on a command line."""
    mine, base = _flatten(cfg.to_dict()), _flatten(config_lib.load(cfg.preset).to_dict())
    return {key: value for key, value in mine.items() if key != "preset" and value != base.get(key)}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_process_count(state, section: str, wanted: int) -> None:
    """StageError where a stage runs on another number of processes than its config says: its global batch
    would differ from the one its manifest records (a hand-typed `accelerate launch --num_processes`, or a
    plain `python -m` of a multi-process preset)."""
    if state.num_processes != wanted:
        raise StageError(f"running {state.num_processes} process(es) but {section}.num_processes is {wanted}: "
                         f"launch {wanted} (accelerate launch --num_processes {wanted}), or set {section}.num_processes "
                         f"to {state.num_processes} (--override {section}.num_processes={state.num_processes})")


def check_gpu_count(cfg: Config, section: str) -> None:
    """StageError before a launch of more GPU processes than this machine shows GPUs: each process takes the
    GPU of its local rank, and those past the last would fail one by one with "invalid device ordinal". A
    machine without CUDA runs the processes on the CPU (use_cpu), so it passes."""
    import torch

    settings = getattr(cfg, section)
    if settings.num_processes <= 1 or config_lib.launcher(settings.accelerate_config).use_cpu \
            or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if settings.num_processes > gpus:
        raise StageError(f"{section}.num_processes is {settings.num_processes} but this machine shows {gpus} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): set "
                         f"{section}.num_processes to {gpus} (--override {section}.num_processes={gpus}), or run "
                         "where there are more")


def stage_command(cfg: Config, module: str, section: str, extra: Sequence[str] = (),
                  use_accelerate: bool | None = None) -> list[str]:
    """The command that runs a training stage: `python -m paper_lib.<module> --preset P --override k=v ...`
    with the settings in which cfg differs from its preset, then `extra`; behind `accelerate launch
    --config_file configs/accelerate/<section.accelerate_config>.yaml --num_processes <section.num_processes>`
    unless (use_accelerate=None) that is one process with no distributed backend. A preset that is not
    under configs/presets travels whole, as a preset file beside the stage's log. (config.load has checked
    that the accelerate config exists.)"""
    settings = getattr(cfg, section)
    acc_path = ACCELERATE_DIR / f"{settings.accelerate_config}.yaml"
    args = ["-m", f"paper_lib.{module}"]
    if cfg.preset in config_lib.available_presets():
        args += ["--preset", cfg.preset]
        for key, value in config_overrides(cfg).items():
            args += ["--override", f"{key}={json.dumps(value)}"]
    else:  # named after the preset, so the child writes to the same runs/<preset>/
        preset_file = stage_log(cfg, module).parent / f"{module}-config" / f"{cfg.preset}.yaml"
        preset_file.parent.mkdir(parents=True, exist_ok=True)
        settings_tree = json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "preset"}))
        preset_file.write_text(yaml.safe_dump(settings_tree, sort_keys=False))
        args += ["--preset", str(preset_file)]
    args += list(extra)
    if use_accelerate is None:
        use_accelerate = settings.num_processes > 1 or config_lib.launcher(acc_path).distributed_type != "NO"
    if not use_accelerate:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_path),
            "--num_processes", str(settings.num_processes), *args]


RUN_LOG = "run.log"  # in a run's own directory: the log of the command that finished it


def stage_log(cfg: Config, module: str) -> Path:
    """runs/<preset>/logs/<module>.log: every run of the stage appends to it (kept when a run is redone)."""
    return artifacts.run_dir(cfg) / "logs" / f"{module}.log"


def run_stage(cfg: Config, module: str, section: str, extra: Sequence[str] = (), stream: bool = True,
              keep_log_in: Path | None = None) -> None:
    """Run a training stage's command (stage_command) to its end, streaming it into its log; StageError
    with the tail of the log when it fails. With keep_log_in, this run's part of the log is also written
    to <keep_log_in>/run.log, so that the log travels with the run it made (moved aside, moved back)."""
    check_gpu_count(cfg, section)
    command = stage_command(cfg, module, section, extra)
    log_path = stage_log(cfg, module)
    start = log_path.stat().st_size if log_path.is_file() else 0  # the stage log is shared by every run
    log.info("running %s (log: %s)", " ".join(command), log_path)
    code, output = run_streamed(command, log_path, stream=stream)
    if code != 0:
        raise StageError(f"{module} failed with exit code {code}.\ncommand: {' '.join(command)}\nfull log: "
                         f"{log_path}\nlast lines:\n{tail(output, 40)}")
    if keep_log_in is not None and Path(keep_log_in).is_dir():
        with open(log_path, "rb") as fh:
            fh.seek(start)
            mine = fh.read()
        with artifacts.atomic_file(Path(keep_log_in) / RUN_LOG) as tmp:
            tmp.write_bytes(mine)


def run_log_tail(run: Path, lines: int) -> str:
    """The last lines of the log kept with a run (run_stage's keep_log_in), progress-bar redraws collapsed;
    "" for a run made without one (trained by its module's command line, or before logs were kept)."""
    path = Path(run) / RUN_LOG
    return tail(path.read_text(errors="replace"), lines) if path.is_file() else ""


def stage_arguments(prog: str, description: str, what: str) -> argparse.ArgumentParser:
    """The command line every stage module shares: --preset, --override (repeatable), --force."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default="tiny", help="a preset name under configs/presets/ or a .yaml path")
    parser.add_argument("--override", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings, e.g. --override sft.learning_rate=1e-5 rl.num_updates=10")
    parser.add_argument("--force", action="store_true", help=f"{what} afresh even if a finished run matches")
    return parser


def stage_config(args: argparse.Namespace) -> Config:
    """The settings a stage module's command line names (stage_arguments)."""
    return config_lib.load(args.preset, **parse_overrides([item for group in args.override for item in group]))
