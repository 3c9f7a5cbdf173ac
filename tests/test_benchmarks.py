"""Every benchmark script runs end to end in its quick mode, so a broken benchmark is caught here and not
by its next user. Nothing is timed: the scripts measure, these tests only run them."""
import datetime
import json
import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest

from paper_lib.config import PROJECT_ROOT

QUICK = {
    "bench_eval.py": ["--hands", "2"],
    "bench_eval_processes.py": ["--checkpoints", "2"],
    "bench_generate.py": ["--preset", "tiny", "--batches", "1,2", "--dtypes", "float32", "--tokens", "4"],
    "bench_ppo.py": ["--updates", "1"],
    "bench_rerun.py": ["--examples", "32"],
    "bench_restore.py": ["--layers", "1", "--vocab", "2048", "--top", "8"],
    "bench_sft.py": ["--threads", "1", "--examples", "32"],
    "bench_spectra.py": ["--layers", "1", "--vocab", "2048", "--k", "8", "--threads", "1", "--no-docs"],
}


def test_every_benchmark_script_has_a_quick_mode_here():
    scripts = {p.name for p in (PROJECT_ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts == set(QUICK) | {"bench_run.py"}  # bench_run reads a finished run: tested below on one


@pytest.mark.parametrize("script", sorted(QUICK))
def test_benchmark_runs_in_quick_mode_and_leaves_the_docs_alone(script, tmp_path):
    docs = PROJECT_ROOT / "docs" / "benchmarks.md"
    before = docs.read_bytes() if docs.is_file() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / script), *QUICK[script]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "|" in done.stdout  # each prints its markdown result table
    assert (docs.read_bytes() if docs.is_file() else None) == before


def _notebook(path, start, end):
    """An executed notebook as ./run_all.sh leaves it: papermill's metadata is what bench_run reads."""
    stamp = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": [], "metadata": {"papermill": {
        "duration": end - start, "start_time": stamp(start), "end_time": stamp(end), "exception": None}}}))


def test_bench_run_reports_a_run_from_its_own_records(tmp_path, tiny_base):
    """A run made by hand with the stages' own manifest writer: SFT tokens/s and MFU, PPO's split after the
    first update, evaluation episodes/s, and a stage reused from an earlier run kept out of the timings."""
    import torch
    from safetensors.torch import save_file

    from paper_lib import artifacts

    run = tmp_path / "runs" / "tiny"
    for stage in ("models/base", "sft", "rl", "eval/sft-0008", "eval/old"):
        (run / stage).mkdir(parents=True)
    save_file({"w": torch.zeros(10, 10), "b": torch.zeros(5)}, str(run / "models" / "base" / "model.safetensors"))
    now = time.time()
    _notebook(run / "notebooks" / "02_sft.ipynb", now - 60, now + 60)
    _notebook(run / "notebooks" / "03_ppo.ipynb", now + 60, now + 90)
    gpu = "NVIDIA H100 80GB HBM3"
    artifacts.write_manifest(run / "sft", {"stage": "sft"}, device=gpu, seconds=3.0, final_step=8, processes=1,
                             train_tokens=60_000, train_seconds=2.0)
    artifacts.write_manifest(run / "rl", {"stage": "rl"}, device=gpu)
    pd.DataFrame({"update": [1, 2, 3], "attempts": [8, 8, 8], "response_tokens": [100, 50, 50],
                  "rollout_seconds": [10.0, 1.0, 1.0], "seconds": [20.0, 3.0, 3.0]}).to_csv(run / "rl" / "metrics.csv")
    artifacts.write_manifest(run / "eval" / "sft-0008", {"stage": "eval"}, device=gpu, seconds=12.0, episodes=468,
                             attempts=936)
    artifacts.write_manifest(run / "eval" / "old", {"stage": "eval"}, device=gpu, seconds=99.0, episodes=1, attempts=1)
    old = json.loads((run / "eval" / "old" / "manifest.json").read_text())
    old["provenance"]["finished"] = "2020-01-01T00:00:00+0000"
    (run / "eval" / "old" / "manifest.json").write_text(json.dumps(old))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT),
           "PAPER_RUNS_DIR": str(tmp_path / "runs")}
    # 6 x 105 parameters x 30,000 tokens/s = 1.89e-5 TFLOP/s: half of this made-up peak
    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_run.py"), "--preset", "tiny",
               "--peak-tflops", "3.78e-5", "--spectra-pair", str(tiny_base.path), str(tiny_base.path)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"a run of code {artifacts.git_version()} on {gpu}." in out
    assert "| 8 | 1 | 60,000 | 2.0 | 3.0 | 30,000 | 0.00 | 50.0% |" in out
    assert "| 8 | 50 | 1.00 | 2.00 | 3.00 |" in out  # the first update, the slow one, is left out
    assert "| sft-0008 | 468 | 936 | 12.0 | 39.0 |" in out and "| old |" not in out
    assert "Reused from an earlier run, so not timed here: eval/old." in out
    assert "run back to back" in out and "| 02_sft | 120.0 |" in out
    assert re.search(r"\| cpu \| CPU \(\d+ cores\) \| \d+ \|", out)  # the pair timed afresh on the CPU


def test_bench_run_without_a_run_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PAPER_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_run.py"), "--preset", "tiny"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "run `./run_all.sh tiny` first" in done.stderr
    assert "Traceback" not in done.stderr
