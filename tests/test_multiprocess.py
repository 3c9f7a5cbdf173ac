"""Two processes on the CPU (accelerate's MULTI_CPU over gloo, configs/accelerate/multi_cpu.yaml) against
one, at the same global batch: SFT, PPO and evaluation on the tiny preset. Each test first checks from the
per-rank lines (launch.report_processes) that two processes really ran and each did its half.
Select with `pytest -m multiprocess`."""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from transformers import AutoModelForCausalLM

from paper_lib import actor_critic, artifacts, config, data, evaluate, launch, ppo, sft
from paper_lib.config import PROJECT_ROOT

pytestmark = pytest.mark.multiprocess

MULTI = str(PROJECT_ROOT / "configs" / "accelerate" / "multi_cpu.yaml")
RANK_LINE = re.compile(r"\[(\w+)\] rank (\d+) of world size (\d+): (.*)")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ranks(text: str, stage: str) -> dict[int, tuple[int, str]]:
    """rank -> (world size it saw, its share) from the per-rank lines of one stage."""
    found = {}
    for m in RANK_LINE.finditer(text):
        if m.group(1) == stage:
            found[int(m.group(2))] = (int(m.group(3)), m.group(4))
    return found


def assert_two_processes(text: str, stage: str) -> dict[int, str]:
    seen = ranks(text, stage)
    assert sorted(seen) == [0, 1], f"expected ranks 0 and 1 in the {stage} log, got {seen}:\n{text[-3000:]}"
    assert all(world == 2 for world, _ in seen.values()), seen
    return {rank: share for rank, (_, share) in seen.items()}


# SFT: 6 steps of a global batch of 8, checkpoints at 3 and 6, a loss point every 2 steps
SFT_SMALL = {"data.sft_size": 48, "data.test_size": 8, "data.loss_set_size": 8, "sft.save_steps": 3,
             "sft.eval_steps": 2}


def test_sft_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / "one"))
    one = config.load("tiny", **SFT_SMALL, **{"sft.per_device_batch_size": 8})
    sft.run(one, stream=False)
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / "two"))
    two = config.load("tiny", **SFT_SMALL, **{"sft.per_device_batch_size": 4, "sft.num_processes": 2,
                                              "sft.accelerate_config": "multi_cpu"})
    out = sft.run(two, stream=False)
    log = launch.stage_log(two, "sft").read_text()
    shares = assert_two_processes(log, "sft")
    assert all(share.startswith("4 examples per optimizer step (of 8") for share in shares.values()), shares
    assert log.count(f"SFT checkpoints in {out}\n") == 1  # the closing line, from rank 0 alone

    assert list(sft.checkpoints(two)) == [3, 6] == list(sft.checkpoints(one))
    assert artifacts.read_manifest(out)["provenance"]["processes"] == 2
    # written once, by the main process: one weights file, no per-rank leftovers, a plain HF checkpoint
    last = sft.checkpoints(two)[6]
    assert sorted(p.name for p in last.glob("*.safetensors")) == ["model.safetensors"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert AutoModelForCausalLM.from_pretrained(last).config.num_hidden_layers == 2
    # weights only, but for the newest, which keeps the optimizer state a resume needs
    assert (last / "optimizer.pt").is_file() and not (sft.checkpoints(two)[3] / "optimizer.pt").exists()
    # the same curves within 2e-3 (the global batch is the same; only the sum order of the gradient differs)
    a, b = sft.loss_table(one), sft.loss_table(two)
    merged = a.merge(b, on=["step", "curve"], suffixes=("_one", "_two"))
    assert len(merged) == len(a) == len(b) > 0
    assert merged["loss_one"].to_numpy() == pytest.approx(merged["loss_two"].to_numpy(), abs=2e-3)


def _preset(tmp_path, name="tiny", **sections):
    settings = config.load("tiny").to_dict()
    settings.pop("preset")
    for section, values in sections.items():
        settings[section].update(values)
    path = tmp_path / "preset" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(settings))
    return path


def _two_process_ppo(tiny_base, tmp_path, updates: int, **rl):
    """A two-process PPO preset of `updates` updates of 4 attempts, a checkpoint each, on the tiny base
    standing in for the full-SFT checkpoint; `rl` overrides more settings."""
    preset = _preset(tmp_path, rl={"num_updates": updates, "save_every": 1, "steps_per_update": 4,
                                   "max_new_tokens": 8, "num_processes": 2, "accelerate_config": "multi_cpu", **rl})
    cfg = config.load(preset)
    shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
    shutil.copytree(tiny_base.path, artifacts.sft_dir(cfg) / "checkpoint-4")
    return preset, cfg


def test_ppo_two_processes(tiny_base, tmp_path):
    preset, cfg = _two_process_ppo(tiny_base, tmp_path, updates=2)
    out = ppo.run(cfg)
    log = launch.stage_log(cfg, "ppo").read_text()
    shares = assert_two_processes(log, "ppo")
    assert all(share == "4 attempts per update (of 8 in all)" for share in shares.values()), shares
    m = pd.read_csv(out / "metrics.csv")
    assert m["update"].tolist() == [1, 2], "one row per update, written once"
    assert sorted(ppo.checkpoints(cfg)) == [1, 2]
    for n in (1, 2):
        assert sorted(p.name for p in (out / f"checkpoint-{n}").glob("*.safetensors")) == \
            ["model.safetensors", "value_head.safetensors"]
    assert not (out / "checkpoint-1" / "trainer_state").exists() and (out / "checkpoint-2" / "trainer_state").is_dir()
    assert actor_critic.load_value_head(out / "checkpoint-2" / "value_head.safetensors").hidden_size == \
        actor_critic.hidden_size(AutoModelForCausalLM.from_pretrained(out / "checkpoint-2"))
    # one process at the same global batch (8 attempts an update): the same attempts per update, so the
    # two-process row is the sum over both processes, not one process's half
    single = config.load(preset, rl__steps_per_update=8, rl__num_processes=1, rl__accelerate_config="single")
    shutil.rmtree(out)
    ppo.train(single, progress=False)
    one = pd.read_csv(out / "metrics.csv")
    assert one["attempts"].tolist() == m["attempts"].tolist() == [8, 8]
    assert one["episodes"].sum() > 0 and m["episodes"].sum() > 0
    # rl.lr_steps_per_update "processes" (the authors' prepared scheduler): the cosine over num_updates = 2
    # steps twice an update on two processes, so update 2 already runs at the minimum; once on one
    lr, low = cfg.rl.learning_rate, cfg.rl.min_learning_rate
    assert m["learning_rate"].tolist() == pytest.approx([lr, low])
    assert one["learning_rate"].tolist() == pytest.approx([lr, (lr + low) / 2])


def test_one_cosine_step_per_update_on_two_processes(tiny_base, tmp_path):
    _, cfg = _two_process_ppo(tiny_base, tmp_path, updates=2, lr_steps_per_update="one")
    m = pd.read_csv(ppo.run(cfg) / "metrics.csv")
    assert_two_processes(launch.stage_log(cfg, "ppo").read_text(), "ppo")
    lr, low = cfg.rl.learning_rate, cfg.rl.min_learning_rate
    assert m["learning_rate"].tolist() == pytest.approx([lr, (lr + low) / 2]), "a half cosine over the run"


def kill_group_when(cmd: list[str], ready, log_path) -> None:
    """Start a two-process launch in its own process group; SIGKILL the whole group (the launcher and both
    ranks) as soon as ready() holds, as a crash or an operator's kill -9 would."""
    assert "accelerate.commands.launch" in cmd
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while not ready():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_two_process_sft_resumes_after_sigkill_of_the_group(tmp_path):
    cfg = config.load("tiny", **{**SFT_SMALL, "data.sft_size": 96, "sft.per_device_batch_size": 4,
                                              "sft.num_processes": 2, "sft.accelerate_config": "multi_cpu"})  # 12 steps
    out = artifacts.sft_dir(cfg)
    data.build(cfg)
    sft.manifest_spec(cfg)  # the base model, built before the launch as sft.run does
    # a complete checkpoint, not a trainer_state.json that exists: the Trainer opens it before it writes it
    kill_group_when(sft.launch_command(cfg), lambda: bool(sft.checkpoints(cfg)), tmp_path / "killed.log")
    assert_two_processes((tmp_path / "killed.log").read_text(), "sft")
    survived = sft.checkpoints(cfg)
    assert artifacts.read_manifest(out) is None and max(survived) < 12, "killed mid-run"
    last = survived[max(survived)]
    stamp = (last / "trainer_state.json").stat().st_mtime_ns

    sft.run(cfg, stream=False)
    log = launch.stage_log(cfg, "sft").read_text()
    assert_two_processes(log, "sft")
    assert f"resuming from {last}" in log
    assert list(sft.checkpoints(cfg)) == [3, 6, 9, 12]
    assert (last / "trainer_state.json").stat().st_mtime_ns == stamp, "the checkpoint resumed from is not redone"
    assert json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["global_step"] == 12
    table = sft.loss_table(cfg)
    assert not table.duplicated(["step", "curve"]).any(), "no step repeated"
    assert sorted(table.loc[table.curve == "id_train", "step"]) == list(range(2, 13, 2)), "no step lost"


def test_evaluation_split_across_two_processes_equals_one(tiny_base, tmp_path):
    preset = _preset(tmp_path, data={"test_size": 6}, eval={"max_new_tokens": 8, "max_attempts": 1,
                                                             "decoding": "greedy"})
    cfg = config.load(preset)
    data.build(cfg)
    base = str(tiny_base.path)
    args = ["-m", "paper_lib.evaluate", "--preset", str(preset), "--checkpoint", base]
    single = subprocess.run([sys.executable, *args, "--label", "one"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", MULTI,
                             "--num_processes", "2", *args, "--label", "two"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    shares = assert_two_processes(double.stdout + double.stderr, "eval")
    n = len(data.load(cfg)["id_test"]["cards"]) + len(data.load(cfg)["ood_test"]["cards"])
    assert sorted(shares.values()) == [f"{n // 2} of {n} hands"] * 2
    one = evaluate.episodes_table(artifacts.eval_dir(cfg) / "own" / "one")  # --checkpoint: eval/own/
    two = evaluate.episodes_table(artifacts.eval_dir(cfg) / "own" / "two")
    assert len(two) == n and not two.duplicated(["rule", "hand"]).any(), "each hand once"
    pd.testing.assert_frame_equal(one.reset_index(drop=True), two.reset_index(drop=True))


def test_two_process_ppo_resumes_after_sigkill_of_the_group(tiny_base, tmp_path):
    _, cfg = _two_process_ppo(tiny_base, tmp_path, updates=4)
    out = artifacts.rl_dir(cfg)
    kill_group_when(ppo.launch_command(cfg), lambda: 2 in ppo.checkpoints(cfg), tmp_path / "killed.log")
    assert_two_processes((tmp_path / "killed.log").read_text(), "ppo")
    survived = max(ppo.checkpoints(cfg))
    assert artifacts.read_manifest(out) is None and survived < 4, "killed mid-run"
    stamp = (out / f"checkpoint-{survived}" / "model.safetensors").stat().st_mtime_ns

    ppo.run(cfg, stream=False)
    log = launch.stage_log(cfg, "ppo").read_text()
    assert_two_processes(log, "ppo")
    assert f"update {survived} of 4" in log  # "resuming from ... (update N of 4)"
    assert sorted(ppo.checkpoints(cfg)) == [1, 2, 3, 4] and artifacts.read_manifest(out) is not None
    assert (out / f"checkpoint-{survived}" / "model.safetensors").stat().st_mtime_ns == stamp, "not redone"
    assert pd.read_csv(out / "metrics.csv")["update"].tolist() == [1, 2, 3, 4], "no update lost or repeated"


def _perturbed_copy(source, out):
    """A copy of a checkpoint with one matrix scaled, so that its episodes differ from the source's."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    shutil.copytree(source, out)  # the tokenizer and its chat template
    model.save_pretrained(out)
    return out


def test_a_sweep_on_two_processes_plays_each_checkpoint_as_one_process_would(tiny_base, tmp_path, monkeypatch):
    """eval.num_processes 2: the sweep deals the checkpoints out to two processes, each playing whole
    checkpoints. Under sampled decoding, two passes, every checkpoint's episodes equal a one-process
    sweep's, draw for draw; a second sweep finds them all cached and launches nothing."""
    sampled = {"max_new_tokens": 8, "max_attempts": 2, "decoding": "model", "repeats": 2}
    tables, episodes, launched = {}, {}, {}
    for name, processes in (("one", {}), ("two", {"num_processes": 2, "accelerate_config": "multi_cpu"})):
        monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / name))
        cfg = config.load(_preset(tmp_path, data={"test_size": 4}, eval={**sampled, **processes}))
        shutil.copytree(tiny_base.path, artifacts.base_model_dir(cfg))
        shutil.copytree(tiny_base.path, artifacts.sft_dir(cfg) / "checkpoint-2")
        _perturbed_copy(tiny_base.path, artifacts.sft_dir(cfg) / "checkpoint-4")
        tables[name] = evaluate.sweep(cfg)
        episodes[name] = {c.label: (evaluate.episodes_table(evaluate.episodes_dir(cfg, c)),
                                    artifacts.read_manifest(evaluate.episodes_dir(cfg, c))["provenance"])
                          for c in evaluate.discover_checkpoints(cfg)}
        log = launch.stage_log(cfg, "evaluate")
        launched[name] = log.read_text() if log.exists() else None
    assert launched["one"] is None, "one process: played in the notebook's process"
    shares = assert_two_processes(launched["two"], "eval")
    assert shares == {0: "2 of 3 checkpoints", 1: "1 of 3 checkpoints"}
    assert sorted(episodes["two"]) == ["base", "sft-0002", "sft-0004"]
    for label, (mine, provenance) in episodes["two"].items():
        theirs = episodes["one"][label][0]
        assert len(mine) == 2 * 8 and sorted(set(mine["repeat"])) == [0, 1]
        assert mine.drop(columns="transcript").equals(theirs.drop(columns="transcript")), label
        assert list(mine["transcript"]) == list(theirs["transcript"]), f"{label}: the same draws"
        assert provenance["processes"] == 1, "each checkpoint played by one process"
    text = lambda label: [t["text"] for ts in episodes["two"][label][0]["transcript"] for t in ts]  # noqa: E731
    assert text("sft-0004") != text("sft-0002"), "the perturbed checkpoint plays otherwise"
    pd.testing.assert_frame_equal(tables["two"], tables["one"])

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched although every checkpoint was cached: {args}")

    monkeypatch.setattr(launch, "run_stage", no_launch)
    pd.testing.assert_frame_equal(evaluate.sweep(cfg), tables["two"])
