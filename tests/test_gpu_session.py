"""The GPU session's own machinery (scripts/gpu_session.sh, scripts/pack_results.py), on the CPU: what comes
back from the machine, and a driver run end to end on the tiny preset's first notebook."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import pack_results  # noqa: E402


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def members(out: Path) -> set[str]:
    data = b"".join(p.read_bytes() for p in sorted(out.glob("results.tar.gz*")))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return set(tar.getnames())


def test_pack_brings_back_tables_and_manifests_never_weights(tmp_path):
    s = tmp_path / "session"
    run = s / "runs" / "smol"
    keep = ["runs/smol/eval/results.parquet", "runs/smol/eval/sft-0300/episodes.jsonl",
            "runs/smol/eval/sft-0300/manifest.json", "runs/smol/sft/checkpoint-25/manifest.json",
            "runs/smol/sft/losses.csv", "runs/smol/data/manifest.json", "runs/smol/notebooks/04_eval.ipynb",
            "runs/smol/logs/sft.log", "figures/smol/fig1_success.png", "figures/smol/fig1_success.json",
            "benchmarks.md", "run_all.log", "session.txt"]
    for rel in keep:
        touch(s / rel)
    ckpt = run / "sft" / "checkpoint-25"
    drop = [touch(ckpt / "model.safetensors"), touch(ckpt / "config.json"), touch(ckpt / "tokenizer.json"),
            touch(ckpt / "trainer_state.json"), touch(run / "data" / "id_test" / "state.json"),
            touch(run / "svd_cache" / "a" / "manifest.json"), touch(run / "eval.stale-2026" / "x.csv"),
            touch(run / "restore" / "top.partial" / "manifest.json"), touch(run / "eval" / "t.csv.tmp-12"),
            touch(run / "eval" / ".sft-0025.partial-4242" / "manifest.json"),  # atomic_dir's scratch
            touch(run / "rl" / "rl-0004" / "trainer_state" / "state.json"), touch(s / "whl" / "a.whl")]
    written = pack_results.pack(s, "smol", tmp_path / "out")
    assert written == [tmp_path / "out" / "results.tar.gz"]
    assert members(tmp_path / "out") == set(keep)
    assert (tmp_path / "out" / "label").read_text() == "final\n"
    assert not any(str(p.relative_to(s)) in members(tmp_path / "out") for p in drop)


def test_pack_splits_an_archive_over_the_limit_and_replaces_the_last(tmp_path):
    s = tmp_path / "session"
    touch(s / "runs" / "tiny" / "eval" / "big.jsonl", os.urandom(300_000))  # random: gzip cannot shrink it
    out = tmp_path / "out"
    touch(out / "results.tar.gz")  # an earlier, whole archive
    parts = pack_results.pack(s, "tiny", out, label="partial", max_mib=0.1)
    assert [p.name for p in parts] == ["results.tar.gz.part-0", "results.tar.gz.part-1", "results.tar.gz.part-2"]
    assert all(p.stat().st_size <= 0.1 * 2**20 for p in parts)
    assert sorted(p.name for p in out.glob("results.tar.gz*")) == [p.name for p in parts]
    assert members(out) == {"runs/tiny/eval/big.jsonl"}
    assert (out / "label").read_text() == "partial\n"


def test_pack_without_a_run_is_one_line(tmp_path, capsys):
    assert pack_results.main([str(tmp_path), "smol", str(tmp_path / "out")]) == 2
    assert "runs/smol does not exist" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_session_runs_the_driver_and_brings_its_archive_out(tmp_path):
    """start -> the driver in its own session -> run_all.sh -> the run's timings -> the archive -> $OUT, with
    every write outside the repo (the device tool re-syncs the repo copy at each call)."""
    env = {**os.environ, "GPU_SESSION_DIR": str(tmp_path / "s"), "OUT": str(tmp_path / "out"),
           "PAPER_PYTHON": sys.executable, "GPU_RUN_ARGS": "--only 1", "GPU_RUN_BUDGET_S": "400"}
    env.pop("PAPER_RUNS_DIR", None)
    env.pop("PAPER_FIGURES_DIR", None)
    (tmp_path / "out").mkdir()
    docs_before = (ROOT / "docs" / "benchmarks.md").read_text()
    script = str(ROOT / "scripts" / "gpu_session.sh")
    done = subprocess.run([script, "start", "tiny", "300"], env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "driver done (rc 0)" in done.stdout
    assert "==> 01_data (preset tiny)" in done.stdout
    got = members(tmp_path / "out")
    for rel in ("runs/tiny/notebooks/01_data.ipynb", "runs/tiny/data/manifest.json",
                "figures/tiny/data_solutions_per_hand.png", "benchmarks.md", "run_all.log", "session.txt"):
        assert rel in got, f"{rel} missing from {sorted(got)}"
    assert not any(name.endswith((".arrow", ".safetensors")) for name in got)
    assert "bench_run_tiny" in (tmp_path / "s" / "benchmarks.md").read_text()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs_before
    assert "no extras" in (tmp_path / "s" / "driver.log").read_text()  # no SFT checkpoint: nothing to time
    session = (tmp_path / "s" / "session.txt").read_text()
    assert "label final" in session and "run.rc 0" in session
    assert any(line.startswith("code ") and len(line) > len("code ") for line in session.splitlines())
    # a later call finds the finished driver at once and hands the same archive out again
    again = subprocess.run([script, "collect", "60"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "driver done (rc 0)" in again.stdout, again.stdout + again.stderr
