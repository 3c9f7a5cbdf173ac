#!/usr/bin/env bash
# Open the notebooks in JupyterLab, in the project's environment.
#
#   ./lab.sh [jupyter lab args]        e.g. ./lab.sh --no-browser --port 8899
#
# Creates or reuses the environment (scripts/ensure_env.sh). A double click on notebooks/NN_*.py opens it
# as a notebook (jupytext, see jupytext.toml); its kernel "python3" is this environment's python.
# Lab state (settings, workspaces, the kernel spec) lives in .jupyter/ in the repo (git-ignored): nothing is
# written into ~/.jupyter. Executed copies of a headless run open from runs/<preset>/notebooks/.
# PAPER_LAB_DIR (that state) and PAPER_LAB_ROOT (the served folder) let the tests use tmp dirs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
py="$(scripts/ensure_env.sh | tail -n 1)"
state="${PAPER_LAB_DIR:-$root/.jupyter}"
mkdir -p "$state/lab/user-settings" "$state/lab/workspaces"
# the repo's lab settings (default viewer for .py) win over earlier copies; other settings the user made stay
cp -R configs/jupyterlab/user-settings/. "$state/lab/user-settings/"
# the notebooks name the kernel "python3" ("Python 3"): point that name at this environment, ahead of any
# user kernel (the same display name, so that saving a notebook leaves its header as it is)
export JUPYTER_PATH="$state/env/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
"$py" -m ipykernel install --prefix "$state/env" --name python3 --display-name "Python 3" >/dev/null
export JUPYTER_CONFIG_DIR="$state/config"
as_root=(); [ "$(id -u)" = 0 ] && as_root=(--allow-root)  # containers and CI run as root
exec "$py" -m jupyter lab --ServerApp.root_dir="${PAPER_LAB_ROOT:-$root}" \
  --LabApp.user_settings_dir="$state/lab/user-settings" --LabApp.workspaces_dir="$state/lab/workspaces" \
  --LabApp.default_url="/lab/tree/notebooks" "${as_root[@]}" "$@"
