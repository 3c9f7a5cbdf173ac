"""The RL stage's run directory, shared by PPO (ppo.py) and GRPO (grpo.py): the reward, the checkpoint RL
starts from, the spec a finished run must match, and whether a run starts afresh, resumes or is skipped.
Outputs live under runs/<preset>/rl/ (ppo.py's docstring lists them)."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

from . import artifacts, cards, launch, models
from .config import Config

log = logging.getLogger(__name__)

Grade = Callable[[cards.Hand, str], cards.Verdict]  # (hand, answer text) -> verdict with .reward


def verifier(target: int = cards.TARGET, partial_credit: str = "arithmetic") -> Grade:
    """The reward of PAPER_SPEC 2.4 for one answer (rl.partial_credit decides PARTIAL)."""
    return lambda hand, text: cards.verify_formula(cards.parse_formula(text), hand.numbers, target, partial_credit)


def init_checkpoint(cfg: Config, path: str | os.PathLike | None = None) -> Path:
    """Where PPO starts: `path` if given, else the full-SFT checkpoint, sft_dir/checkpoint-<full_sft_step>
    if it exists, else the last SFT checkpoint."""
    if path is not None:
        return models.checkpoint_path(path)
    found = artifacts.numbered_checkpoints(artifacts.sft_dir(cfg))
    if not found:
        raise FileNotFoundError(
            f"PPO starts from the full-SFT checkpoint, but {artifacts.sft_dir(cfg)} holds no SFT checkpoint "
            f"(checkpoint-N with config.json and *.safetensors). Run notebooks/02_sft.py first (or `python -m "
            f"paper_lib.sft --preset {cfg.preset}`), or pass init_checkpoint=PATH / --init-checkpoint PATH.")
    return found[artifacts.full_sft_step(cfg, found)]


METRICS = "metrics.csv"  # one row per update
REDO_RL = "redo RL with force=True (`python -m paper_lib.ppo --force`); the damaged run is kept until then"


def validate_init(cfg: Config, init: Path) -> None:
    """A damaged initial checkpoint stops the run before rl/ is touched, naming the file and the fix."""
    artifacts.validate_checkpoint(init, f"python -m paper_lib.sft --preset {cfg.preset} --force (or "
                                        f"./run_all.sh {cfg.preset} --only 2 with force=True)")


def checkpoints(cfg: Config) -> dict[int, Path]:
    """{update: path} of the RL checkpoints written so far."""
    return artifacts.numbered_checkpoints(artifacts.rl_dir(cfg))


def default_envs(cfg: Config) -> int:
    """Slots per process where rl.env_slots is 0: the largest divisor of steps_per_update that leaves every
    slot at least max_attempts rounds, so generation is batched and each update sees whole episodes
    (upstream plays one slot per process: rl.env_slots 1)."""
    steps = cfg.rl.steps_per_update
    return max(d for d in range(1, steps + 1) if steps % d == 0 and steps // d >= min(cfg.eval.max_attempts, steps))


def run_spec(cfg: Config, init: Path, grade_name: str = "verifier") -> dict:
    """What a finished run's manifest must match for it to be reused (rl.env_slots as played: 0 and the
    count it stands for are one run)."""
    rl = {**dataclasses.asdict(cfg.rl), "env_slots": cfg.rl.env_slots or default_envs(cfg)}
    return {"stage": "rl", "rl": rl, "max_attempts": cfg.eval.max_attempts,
            "target": cfg.data.target, "init": artifacts.portable_path(init), "init_weights": artifacts.fingerprint(init),
            "reward": grade_name,
            "code": artifacts.code_hash("ppo")}


def prepare_run(out: Path, spec: dict, force: bool, processes: int) -> bool:
    """False, on every process, where a finished run matches; else make out ready for the run
    (artifacts.prepare_run_dir, on the main process) and return True. A launch of another number of
    processes than `processes` (rl.num_processes) stops first, before an earlier run is moved aside."""
    from accelerate.utils import broadcast_object_list

    state = launch.process_state()
    finished = [not force and artifacts.up_to_date(out, spec, REDO_RL) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(finished)
    if finished[0]:
        state.wait_for_everyone()
        log.info("%s is up to date (manifest matches); pass force=True to redo it", out)
        return False
    launch.check_process_count(state, "rl", processes)  # every process raises alike: none waits below
    if state.is_main_process:
        artifacts.prepare_run_dir(out, spec, force, "an RL run")
    state.wait_for_everyone()
    return True
