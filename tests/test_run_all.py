"""run_all.sh: the dry run lists notebooks, and a failing notebook stops the run and is named."""
import os
import subprocess
import sys

from paper_lib.config import PROJECT_ROOT

RUN_ALL = str(PROJECT_ROOT / "run_all.sh")

NOTEBOOK = """# %% tags=["parameters"]
preset = "tiny"

# %%
{body}
"""


def run(*args, env_extra=None):
    env = {**os.environ, "PAPER_PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run([RUN_ALL, *args], capture_output=True, text=True, env=env, timeout=600)


def test_dry_run_lists_the_notebooks_in_order_and_honours_from_and_only():
    names = sorted(p.stem for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    out = run("tiny", "--dry-run")
    assert out.returncode == 0, out.stderr
    listing, _, plan = out.stdout.partition("\n\n")  # the notebooks, then the plan (paper_lib.plan)
    listed = [line.split()[0] for line in listing.splitlines()[1:]]
    assert listed == names
    assert "01_data" in listed
    assert plan.startswith("plan for preset 'tiny'") and "total disk" in plan
    only = run("tiny", "--dry-run", "--only", "1")
    assert [line.split()[0] for line in only.stdout.partition("\n\n")[0].splitlines()[1:]] == ["01_data"]


def test_bad_arguments_fail_with_a_message():
    out = run("qwen70b", "--dry-run")
    assert out.returncode == 2 and "unknown preset 'qwen70b'" in out.stderr and "qwen7b" in out.stderr
    assert run("tiny", "--bogus").returncode == 2
    assert run("tiny", "--from", "x").returncode == 2


def test_a_failing_notebook_stops_the_run_and_is_named(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    marker = tmp_path / "third_ran"
    (nbs / "01_ok.py").write_text(NOTEBOOK.format(body="print('fine', preset)"))
    (nbs / "02_broken.py").write_text(NOTEBOOK.format(body="assert preset == 'never', 'deliberate failure'"))
    (nbs / "03_after.py").write_text(NOTEBOOK.format(body=f"open({str(marker)!r}, 'w').write('ran')"))
    runs = tmp_path / "runs"
    out = run("tiny", env_extra={"PAPER_NOTEBOOKS_DIR": str(nbs), "PAPER_RUNS_DIR": str(runs)})
    assert out.returncode == 1
    executed = runs / "tiny" / "notebooks"
    assert "notebook 02_broken FAILED" in out.stderr
    assert str(executed / "02_broken.ipynb") in out.stderr
    assert "deliberate failure" in (executed / "02_broken.ipynb").read_text()
    # the terminal gets the error's last line, not papermill's chained traceback (it stays in the copy)
    assert "AssertionError: deliberate failure" in out.stderr and "Traceback" not in out.stderr
    assert (executed / "01_ok.ipynb").is_file()
    assert not marker.exists()
    # --from skips the earlier notebooks; the papermill parameter reaches the notebook
    again = run("tiny", "--from", "3", env_extra={"PAPER_NOTEBOOKS_DIR": str(nbs), "PAPER_RUNS_DIR": str(runs)})
    assert again.returncode == 0, again.stderr
    assert marker.read_text() == "ran"
    assert "injected-parameters" in (executed / "03_after.ipynb").read_text()  # papermill's -p preset
    # --keep-going runs what follows a failure too, and names every failure at the end
    marker.unlink()
    going = run("tiny", "--keep-going", env_extra={"PAPER_NOTEBOOKS_DIR": str(nbs), "PAPER_RUNS_DIR": str(runs)})
    assert going.returncode == 1 and marker.read_text() == "ran"
    assert "1 of 3 notebook(s) FAILED for preset 'tiny': 02_broken;" in going.stderr


def test_a_preset_is_a_name_and_a_config_error_is_one_line(tmp_path):
    out = run("../../tmp/x", "--dry-run")
    assert out.returncode == 2 and "a preset is a name from configs/presets" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dtype: float8}\n")
    check = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "run_notebook.py"), "--check", str(bad)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 2
    assert check.stderr.strip().splitlines() == ["run_all: config error: model.dtype must be one of "
                                                 "['float32', 'bfloat16', 'float16', 'auto'], got 'float8'"]
