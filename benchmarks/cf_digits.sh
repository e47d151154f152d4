#!/usr/bin/env bash
# Counterfactual check of the score default (issue 16): retrain the digits model without each method's top-k at
# one step for CF_TARGETS targets and compare the completions with the original model's, paired over targets.
# Resumable (rerun to continue; finished models and measurements are reused, so methods can be added later):
#   bash benchmarks/cf_digits.sh                                   # the default vs random, 16 targets
#   CF_METHODS="[kfac_1ckpt@even32, random, trak, pixel]" bash benchmarks/cf_digits.sh   # + TRAK Eq. 3 and pixel
#   GT=runs/lds_digits NUM_MASKS=32 SEEDS_PER_MASK=3 CF_METHODS="[...]" bash benchmarks/cf_digits.sh
#       # on an existing ground truth (benchmarks/lds_digits.sh): its full model, stores, targets, masks and
#       # models are reused (linked into $OUT); nothing is trained but the removals
# Steps (without GT): fit the full model -> featurize its checkpoints (Eq. 3 with the paper's 10 uniform draws,
#        for trak) and its last checkpoint with featurize's defaults (32 even draws, for K-FAC) -> sample targets
#        -> a small LDS set (NUM_MASKS masks, 1 seed: only to choose lambda / damping on the held-out targets) -> lds_report -> counterfactual (k = K, step CF_STEP, no seed-consistency
#        or feature-formation pass).
# The default at CF_STEP = 500: score's target side there is the loss (square_from: auto starts the square output at
# t = 600), so the removals of `score`'s default are those of kfac_1ckpt@even32 (its damping chosen on held-out
# targets: 1e-3 on the digits ground truth, score's default).
# Cost on 2 CPU cores: one retrained model per (target, method), ~2-3 min each per worker, 2 workers side by side.
# Tables: $OUT/counterfactual/counterfactual.csv and paired.csv (method - random, paired over targets).
source "$(dirname "$0")/common.sh"
GT=${GT:-}
OUT=${OUT:-${GT:+$GT/cf}}
OUT=${OUT:-runs/cf_digits}
PLAN=${PLAN:-configs/lds/digits.yaml}
NUM_TARGETS=${NUM_TARGETS:-64}     # half choose lambda / damping, the other half are reported (and counterfactual)
NUM_MASKS=${NUM_MASKS:-8}
SEEDS_PER_MASK=${SEEDS_PER_MASK:-1}
CF_TARGETS=${CF_TARGETS:-16}
CF_STEP=${CF_STEP:-500}
K=${K:-180}
CF_METHODS=${CF_METHODS:-"[kfac_1ckpt@even32, random]"}
METHODS=${METHODS:-"[kfac_1ckpt@even32, trak, pixel, random]"}
PROJ_DIM=${PROJ_DIM:-2048}
MAX_MODELS=${MAX_MODELS:-}
mkdir -p "$OUT"
if [ -n "$GT" ]; then
  SRC=$GT
  for link in masks models; do [ -e "$OUT/$link" ] || ln -s "$(realpath "$GT/$link")" "$OUT/$link"; done
else
  SRC=$OUT
  fit_full "$OUT/full" 0
  FINAL=$(last_checkpoint "$OUT/full")
  timed featurize $PY cli.py featurize --config "$CONFIG" --checkpoints "$(dirname "$FINAL")" --out_dir "$OUT/features" \
    --settings.proj_dim="$PROJ_DIM" --settings.num_draws=10 --settings.timesteps=uniform --settings.batch_size=64 \
    --settings.output=loss --trainer.logger=false --trainer.default_root_dir="$OUT/full" --trainer.enable_progress_bar=false
  timed featurize_even32 $PY cli.py featurize --config "$CONFIG" --checkpoints "$FINAL" --out_dir "$OUT/features_even32" \
    --settings.proj_dim="$PROJ_DIM" --settings.batch_size=64 --trainer.logger=false --trainer.default_root_dir="$OUT/full" \
    --trainer.enable_progress_bar=false
  if [ ! -f "$OUT/targets/targets.json" ]; then
    timed sample $PY cli.py sample --config "$CONFIG" --checkpoint "$FINAL" --out_dir "$OUT/targets" \
      --num_targets "$NUM_TARGETS" --record_steps "[900, 700, 500, 300, 100]" --trainer.logger=false \
      --trainer.default_root_dir="$OUT/full"
  fi
fi
COMMON=(--config "$CONFIG" --plan "$PLAN" --plan.out_dir="$OUT" --plan.features="$SRC/features"
        --plan.targets="$SRC/targets" --plan.num_masks="$NUM_MASKS" --plan.seeds_per_mask="$SEEDS_PER_MASK"
        --plan.replicate_masks=0 "--plan.methods=$METHODS" "--plan.extra_features={\"even32\": \"$SRC/features_even32\"}"
        "--plan.paired_versus=[random, trak, pixel]"
        "--plan.relative_lambdas=[0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]"
        --plan.cf_targets="$CF_TARGETS" --plan.cf_step="$CF_STEP" --plan.forget_step="$CF_STEP"
        "--plan.cf_ks=[$K]" "--plan.cf_methods=$CF_METHODS" --plan.consistency_seeds=0 --plan.formation_targets=0
        --trainer.logger=false)
[ -n "$GT" ] || timed lds_train $PY cli.py lds_train "${COMMON[@]}"
timed lds_outputs $PY cli.py lds_outputs "${COMMON[@]}"
timed lds_report $PY cli.py lds_report "${COMMON[@]}"
timed counterfactual $PY cli.py counterfactual "${COMMON[@]}" ${MAX_MODELS:+--max_models=$MAX_MODELS}
echo "tables: $OUT/counterfactual/counterfactual.csv $OUT/counterfactual/paired.csv"
