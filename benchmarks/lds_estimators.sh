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
# VARIANTS=ens: ENS_SEEDS (default "1 2 3") more full models, trained like the ground truth's (seed s: training RNG
# and data order), each last checkpoint featurized like $FEATURES; methods kfac@ens / trak@ens average over the
# models (compare kfac / trak: the checkpoints of one run, at equal featurize cost).
# FEATURIZE_ONLY=1: make the variants' features (and ensemble models) and stop, e.g. while the ground truth trains.
# Ceiling: REPLICATE_MASKS=k uses seeds 0 and 1 of the first k masks (trained with --plan.replicate_masks=k or
# --plan.seeds_per_mask=2).
GT=${GT:-runs/lds_digits}
REPORT=${REPORT:-$GT/estimators}
TIMINGS=${TIMINGS:-$REPORT/timings.txt}
source "$(dirname "$0")/common.sh"
FEATURES=${FEATURES:-$GT/features}   # the full model's Eq. 3 stores (every checkpoint): the plan's `features`
PLAN=${PLAN:-configs/lds/digits.yaml}
PROJ_DIM=${PROJ_DIM:-2048}
NUM_MASKS=${NUM_MASKS:-32}
SEEDS_PER_MASK=${SEEDS_PER_MASK:-1}
REPLICATE_MASKS=${REPLICATE_MASKS:-0}
VARIANTS=${VARIANTS:-"square l2 avg even stratified even32 even100 norm seed1 identity identity_sq sq_even32 bands"}
METHODS=${METHODS:-"[trak, trak_square@square, trak@square, trak@l2, trak@avg, trak@even, trak@stratified, \
trak@even32, trak@even100, trak@norm, trak@seed1, dual@identity, dual_square@identity_sq, trak_square@sq_even32, \
trak@band_loss, trak_square@band_square, ekfac_1ckpt, kfac_1ckpt, kfac_1ckpt@even32, kfac_1ckpt_stepwise@even32, \
trak_stepwise, pixel, embedding, random]"}
CKPT=$(last_checkpoint "$GT/full")
mkdir -p "$REPORT"
for link in masks models; do [ -e "$REPORT/$link" ] || ln -s "$(realpath "$GT/$link")" "$REPORT/$link"; done

feat() {  # feat <name> <settings...>: the last checkpoint into $GT/features_<name>
  local name=$1; shift
  timed "featurize_$name" $PY cli.py featurize --config "$CONFIG" --checkpoints "$CKPT" --out_dir "$GT/features_$name" \
    --settings.batch_size=64 --settings.num_draws=10 --settings.timesteps=uniform --trainer.logger=false --trainer.enable_progress_bar=false \
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
    ens)  # an ensemble of independently trained full models (seed 0, the ground truth's, and ENS_SEEDS), the last
          # checkpoint of each with the Eq. 3 settings of $FEATURES: methods <estimator>@ens average over the models
      mkdir -p "$GT/features_ens"
      link="$GT/features_ens/seed0"
      [ -e "$link" ] || ln -s "$(realpath "$FEATURES/$(basename "$CKPT" .ckpt)")" "$link"
      for seed in ${ENS_SEEDS:-1 2 3}; do
        fit_full "$GT/full_seed$seed" "$seed"
        member=$(last_checkpoint "$GT/full_seed$seed")
        timed "featurize_ens_seed$seed" $PY cli.py featurize --config "$CONFIG" --checkpoints "$member" \
          --out_dir "$GT/features_ens_seed$seed" --settings.batch_size=64 --settings.num_draws=10 --settings.timesteps=uniform \
          --settings.proj_dim="$PROJ_DIM" --settings.output=loss --trainer.logger=false \
          --trainer.enable_progress_bar=false --trainer.default_root_dir="$GT/full_seed$seed"
        link="$GT/features_ens/seed$seed"
        [ -e "$link" ] || ln -s "$(realpath "$GT/features_ens_seed$seed/$(basename "$member" .ckpt)")" "$link"
      done ;;
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
if [ -n "${FEATURIZE_ONLY:-}" ]; then echo "features made; FEATURIZE_ONLY set: no outputs or report"; exit 0; fi
COMMON=(--config "$CONFIG" --plan "$PLAN" --plan.out_dir="$REPORT" --plan.features="$FEATURES"
  --plan.targets="$GT/targets" --plan.num_masks="$NUM_MASKS" --plan.seeds_per_mask="$SEEDS_PER_MASK"
  --plan.replicate_masks="$REPLICATE_MASKS" --plan.replicate_seeds=2 "--plan.extra_features=$EXTRA"
  "--plan.paired_versus=[pixel, trak]" --trainer.logger=false "--plan.methods=$METHODS")
timed lds_outputs $PY cli.py lds_outputs "${COMMON[@]}"
timed lds_report $PY cli.py lds_report "${COMMON[@]}"
echo "comparison: $REPORT/report/comparison.csv"
