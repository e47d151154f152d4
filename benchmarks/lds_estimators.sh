#!/usr/bin/env bash
# The estimator comparison of issue 16 on an LDS ground truth (made by benchmarks/lds_digits.sh, or by lds_train
# with more seeds per mask): the full model's last checkpoint featurized with each training-side setting, then
# one lds_report over the same masks, models and targets for every method. Resumable (finished stores are kept).
#   GT=runs/lds_digits bash benchmarks/lds_estimators.sh
#   GT=runs/lds_digits VARIANTS="square even32" METHODS="[trak, trak_square@square, trak@even32, pixel, random]" \
#     bash benchmarks/lds_estimators.sh
# GT must hold full/ (the full model: full/**/checkpoints/*.ckpt), features/ (its Eq. 3 stores, the plan's
# `features`), targets/, masks/ and models/. The report goes to $REPORT/report (REPORT defaults to $GT/estimators:
# a root of its own whose masks/ and models/ are links to the ground truth's, so that GT's own report stays).
# Ceiling: REPLICATE_MASKS=k uses seeds 0 and 1 of the first k masks (trained with --plan.replicate_masks=k or
# --plan.seeds_per_mask=2).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
PY=${PY:-.venv/bin/python}
GT=${GT:-runs/lds_digits}
REPORT=${REPORT:-$GT/estimators}
FEATURES=${FEATURES:-$GT/features}   # the full model's Eq. 3 stores (every checkpoint): the plan's `features`
CONFIG=${CONFIG:-configs/lds_digits.yaml}
PLAN=${PLAN:-configs/lds/digits.yaml}
PROJ_DIM=${PROJ_DIM:-2048}
NUM_MASKS=${NUM_MASKS:-32}
SEEDS_PER_MASK=${SEEDS_PER_MASK:-1}
REPLICATE_MASKS=${REPLICATE_MASKS:-0}
VARIANTS=${VARIANTS:-"square l2 avg even stratified even32 even100 norm seed1 identity identity_sq sq_even32 bands"}
METHODS=${METHODS:-"[trak, trak_square@square, trak@square, trak@l2, trak@avg, trak@even, trak@stratified, \
trak@even32, trak@even100, trak@norm, trak@seed1, dual@identity, dual_square@identity_sq, trak_square@sq_even32, \
trak@band_loss, trak_square@band_square, ekfac_1ckpt, kfac_1ckpt, pixel, embedding, random]"}
CKPT=$(find "$GT/full" -path "*checkpoints/*.ckpt" -name "step*.ckpt" 2>/dev/null | sort | tail -1)
[ -n "$CKPT" ] || { echo "no checkpoint under $GT/full" >&2; exit 2; }
mkdir -p "$REPORT"
for link in masks models; do [ -e "$REPORT/$link" ] || ln -s "$(realpath "$GT/$link")" "$REPORT/$link"; done

timed() {  # timed <label> <command...>: run, append the wall time to $REPORT/timings.txt
  local label=$1; shift
  local start=$(date +%s)
  "$@"
  echo "$label $(( $(date +%s) - start )) s" | tee -a "$REPORT/timings.txt"
}
feat() {  # feat <name> <settings...>: the last checkpoint into $GT/features_<name>
  local name=$1; shift
  timed "featurize_$name" $PY cli.py featurize --config "$CONFIG" --checkpoints "$CKPT" --out_dir "$GT/features_$name" \
    --settings.batch_size=64 --settings.num_draws=10 --trainer.logger=false --trainer.enable_progress_bar=false \
    --trainer.default_root_dir="$GT/full" "$@"
}
EXTRA=""
add() { EXTRA="$EXTRA\"$1\": \"$2\", "; }
for v in $VARIANTS; do
  case $v in
    square|l2|avg) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.output="$v" ;;
    even|stratified) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.timesteps="$v" ;;
    even32|even100) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.num_draws="${v#even}" --settings.timesteps=even ;;
    norm) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.normalize_draws=true ;;
    seed1) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.proj_seed=1 ;;
    identity) feat "$v" --settings.projector=identity ;;
    identity_sq) feat "$v" --settings.projector=identity --settings.output=square ;;
    sq_even32) feat "$v" --settings.proj_dim="$PROJ_DIM" --settings.num_draws=32 --settings.output=square --settings.timesteps=even ;;
    bands)  # step-matched: for each recorded step t, training timesteps drawn from [t - 100, t + 100) only
      for out in loss square; do
        for t in 100 300 500 700 900; do
          feat "band_${out}$t" --settings.proj_dim="$PROJ_DIM" --settings.output=$out \
            "--settings.timestep_range=[$(( t - 100 )), $(( t + 100 ))]"
        done
        add "band_$out" "$GT/features_band_${out}{step}"
      done
      continue ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  add "$v" "$GT/features_$v"
done
EXTRA="{${EXTRA%, }}"
COMMON=(--config "$CONFIG" --plan "$PLAN" --plan.out_dir="$REPORT" --plan.features="$FEATURES"
  --plan.targets="$GT/targets" --plan.num_masks="$NUM_MASKS" --plan.seeds_per_mask="$SEEDS_PER_MASK"
  --plan.replicate_masks="$REPLICATE_MASKS" --plan.replicate_seeds=2 "--plan.extra_features=$EXTRA"
  "--plan.paired_versus=[pixel, trak]" --trainer.logger=false "--plan.methods=$METHODS")
timed lds_outputs $PY cli.py lds_outputs "${COMMON[@]}"
timed lds_report $PY cli.py lds_report "${COMMON[@]}"
echo "comparison: $REPORT/report/comparison.csv"
