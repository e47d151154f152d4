#!/usr/bin/env bash
# LDS + counterfactual benchmark on the bundled digits, end to end, resumable (rerun to continue):
#   bash benchmarks/lds_digits.sh                 # the full benchmark (configs/lds/digits.yaml), ~1-1.5 h on 2 cores
# A reduced check of the chain (numbers NOT comparable to the full run):
#   OUT=runs/lds_digits_small FIT_ARGS="--trainer.max_steps=500" NUM_TARGETS=8 PROJ_DIM=512 \
#   PLAN_ARGS="--plan.num_masks=8 --plan.cf_targets=1 --plan.cf_ks=[180] --plan.cf_methods=[trak,random]" \
#   bash benchmarks/lds_digits.sh
# Steps: fit the full model -> featurize its checkpoints (and the last one with the layerwise and the dense
#        projector) -> sample targets -> lds_train -> lds_outputs
#        -> lds_report -> counterfactual. Every step skips finished work. Timings go to $OUT/timings.txt.
OUT=${OUT:-runs/lds_digits}
source "$(dirname "$0")/common.sh"
CLI=${CLI:-cli.py}   # the CLI script (cli.py once LDSCommands is mixed into AttributionTrainer)
PLAN=${PLAN:-configs/lds/digits.yaml}
FIT_ARGS=${FIT_ARGS:-}
NUM_TARGETS=${NUM_TARGETS:-64}   # 32 choose lambda, 32 are reported
PROJ_DIM=${PROJ_DIM:-2048}
RECORD_STEPS=${RECORD_STEPS:-"[900, 700, 500, 300, 100]"}
PLAN_ARGS=${PLAN_ARGS:-}
mkdir -p "$OUT"
fit_full "$OUT/full" 0 $FIT_ARGS
FINAL=$(last_checkpoint "$OUT/full")
# plan.features: the paper's TRAK (Eq. 3, training-side loss, 10 uniform draws); features_square: D-TRAK's square
timed featurize $PY cli.py featurize --config "$CONFIG" --checkpoints "$(dirname "$FINAL")" --out_dir "$OUT/features" \
  --settings.proj_dim="$PROJ_DIM" --settings.num_draws=10 --settings.timesteps=uniform --settings.batch_size=64 --settings.output=loss \
  --trainer.logger=false --trainer.default_root_dir="$OUT/full"
timed featurize_square $PY cli.py featurize --config "$CONFIG" --checkpoints "$(dirname "$FINAL")" \
  --out_dir "$OUT/features_square" --settings.proj_dim="$PROJ_DIM" --settings.num_draws=10 --settings.timesteps=uniform --settings.batch_size=64 \
  --settings.output=square --trainer.logger=false --trainer.default_root_dir="$OUT/full"
# The last checkpoint with featurize's defaults (32 evenly spaced training timesteps): method kfac_1ckpt@even32.
timed featurize_even32 $PY cli.py featurize --config "$CONFIG" --checkpoints "$FINAL" --out_dir "$OUT/features_even32" \
  --settings.proj_dim="$PROJ_DIM" --settings.num_draws=32 --settings.timesteps=even --settings.batch_size=64 \
  --trainer.logger=false --trainer.default_root_dir="$OUT/full"
# The last checkpoint again with the layerwise and the dense Gaussian projector (same d and K): methods
# trak@layerwise and trak@gaussian of the plan, compared with trak_1ckpt (sparse JL, same checkpoint).
for proj in layerwise gaussian; do
  timed "featurize_$proj" $PY cli.py featurize --config "$CONFIG" --checkpoints "$FINAL" --out_dir "$OUT/features_$proj" \
    --settings.proj_dim="$PROJ_DIM" --settings.num_draws=10 --settings.timesteps=uniform --settings.batch_size=64 --settings.projector=$proj \
    --settings.output=loss \
    --trainer.logger=false --trainer.default_root_dir="$OUT/full"
done
if [ ! -f "$OUT/targets/targets.json" ]; then
  timed sample $PY cli.py sample --config "$CONFIG" --checkpoint "$FINAL" --out_dir "$OUT/targets" \
    --num_targets "$NUM_TARGETS" --record_steps "$RECORD_STEPS" --trainer.logger=false \
    --trainer.default_root_dir="$OUT/full"
fi
# FIT_ARGS also go to every subset model, so that they are trained exactly like the full model.
FIT_PLAN=()
if [ -n "$FIT_ARGS" ]; then FIT_PLAN=("--plan.fit_args=[$(echo $FIT_ARGS | sed 's/ /,/g')]"); fi
COMMON=(--config "$CONFIG" --plan "$PLAN" --plan.out_dir="$OUT" --plan.features="$OUT/features"
        --plan.targets="$OUT/targets" "${FIT_PLAN[@]}" $PLAN_ARGS --trainer.logger=false
        "--plan.extra_features={\"even32\": \"$OUT/features_even32\", \"square\": \"$OUT/features_square\", \"layerwise\": \"$OUT/features_layerwise\", \"gaussian\": \"$OUT/features_gaussian\"}")
timed lds_train $PY "$CLI" lds_train "${COMMON[@]}"
timed lds_outputs $PY "$CLI" lds_outputs "${COMMON[@]}"
timed lds_report $PY "$CLI" lds_report "${COMMON[@]}"
timed counterfactual $PY "$CLI" counterfactual "${COMMON[@]}"
echo "tables: $OUT/report/lds.csv $OUT/counterfactual/counterfactual.csv; plots: $OUT/report/*.png $OUT/counterfactual/*.png"
