"""Every benchmark script runs end to end in its quick mode, so a broken benchmark is caught here and not
by its next user. Nothing is timed: the scripts measure, these tests only run them."""
import os
import subprocess
import sys

import pytest

from paper_lib.config import PROJECT_ROOT

QUICK = {
    "bench_eval.py": ["--hands", "2"],
    "bench_generate.py": ["--preset", "tiny", "--batches", "1,2", "--dtypes", "float32", "--tokens", "4"],
    "bench_ppo.py": ["--updates", "1"],
    "bench_restore.py": ["--layers", "1", "--top", "8"],
    "bench_sft.py": ["--threads", "1", "--examples", "32"],
    "bench_spectra.py": ["--layers", "1", "--k", "8", "--threads", "1", "--no-docs"],
}


def test_every_benchmark_script_has_a_quick_mode_here():
    scripts = {p.name for p in (PROJECT_ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts == set(QUICK)


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
