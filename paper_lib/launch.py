"""Running a training stage (SFT, RL) as a subprocess from a notebook or a script.

The child's output (progress bar and log) is written to a log file and echoed as it comes; an interrupt
(a notebook's stop button) stops the whole process group we started; the caller gets the exit code and
the tail of the output for its error message. The child's settings come as `--override section.key=value`.
"""
from __future__ import annotations

import codecs
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import PROJECT_ROOT, ConfigError

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
    """The convention of every `python -m paper_lib.X`: run `work`, print the line it returns and exit 0.
    An error of the user's settings, input or files (ValueError: ConfigError, WeightsError, ArtifactError...;
    OSError: a missing or unwritable file, ModelUnavailableError) is one line on stderr and exit 2, no
    traceback; anything else is a bug and keeps its traceback."""
    try:
        message = work()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
