# Sourced by the benchmark drivers (benchmarks/*.sh): the environment, `timed`, `fit_full`, `last_checkpoint`.
# The driver sets OUT (where timings.txt goes, unless TIMINGS is set) and CONFIG (the fit config) before use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/lds_digits.yaml}

timed() {  # timed <label> <command...>: run, append the wall time to $TIMINGS (default $OUT/timings.txt)
  local label=$1; shift
  local start=$(date +%s)
  "$@"
  echo "$label $(( $(date +%s) - start )) s" | tee -a "${TIMINGS:-$OUT/timings.txt}"
}

fit_full() {  # fit_full <root> <seed> [fit args...]: the full-data model of $CONFIG, trained with seed <seed>
  # (training RNG and data order) into <root>/version_*/checkpoints; skipped once <root>/done exists.
  local root=$1 seed=$2; shift 2
  if [ ! -f "$root/done" ]; then
    timed "fit_$(basename "$root")" $PY cli.py fit --config "$CONFIG" "$@" --seed_everything="$seed" \
      --data.seed="$seed" --trainer.default_root_dir="$root" --trainer.logger.init_args.save_dir="$(dirname "$root")" \
      --trainer.logger.init_args.name="$(basename "$root")" --trainer.enable_progress_bar=false
    touch "$root/done"
  fi
}

last_checkpoint() {  # last_checkpoint <root>: the last step*.ckpt a fit_full wrote under <root>
  local ckpt
  ckpt=$(find "$1" -path "*checkpoints/*.ckpt" -name "step*.ckpt" 2>/dev/null | sort | tail -1)
  [ -n "$ckpt" ] || { echo "no checkpoint under $1" >&2; return 2; }
  echo "$ckpt"
}
