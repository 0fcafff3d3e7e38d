#!/usr/bin/env bash
# One device call: bench/neu_unseen.sh on the GPU (real steel, unseen defects) for each STEPS in $STEPS_LIST,
# on the lines cut beforehand into .gpu_data/neu_unseen (carry it; bench/neu_unseen.py makes them), with
# PRESET (default s14) at --img-size IMG (default 112: 64 px windows upsampled to s14's 8x8 patch grid).
# Raw JSON lines in $OUT (evals, sources in the Inspector's bf16, sources_fp32, train); progress in
# $OUT/log.txt. LIMIT caps the seconds of each STEPS.
source "$(dirname "$0")/gpu_setup.sh"
R=/tmp/neu_unseen; rm -rf $R; cp -r .gpu_data/neu_unseen $R
for steps in ${STEPS_LIST:-300 1500}; do
  R=$R PRESET=${PRESET:-s14} STEPS=$steps DEVICE=cuda TAG=_${PRESET:-s14}_$steps SEED=${SEED:-0} \
    TRAIN_ARGS="--img-size ${IMG:-112} ${TRAIN_ARGS:-}" timeout ${LIMIT:-300} bash bench/neu_unseen.sh
  log "steps $steps done"
done
for m in $(ls -d $R/*_${PRESET:-s14}_* | grep -v "\.") ; do  # the same models' scores in fp32 (A/B of bf16)
  python3 bench/score_sources.py $m $R/$(basename $m | sed 's/_base.*//') --device cuda --precision fp32 \
    --json $R/sources_fp32.jsonl > /dev/null 2>> $R/eval.log
done
cp $R/*.jsonl $R/progress.txt "$OUT/" 2>/dev/null
tail -5 $R/eval.log >> "$OUT/log.txt"
