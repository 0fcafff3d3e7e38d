#!/usr/bin/env bash
# Real steel, unseen defects: for each NEU-DET kind a line of 64x64 windows (bench/neu_unseen.py: good
# parts clear of every box, defects around that kind's boxes), a defect model trained on its good parts
# alone (synthetic pasting; ARMS "base dihedral" adds an arm with --dihedral-jitter), then `lineinspect
# eval` and bench/score_sources.py on its test split. One JSON line per model in $R/evals.jsonl and
# $R/sources.jsonl. TRAIN_ARGS adds `lineinspect train` options to every arm, TAG names those models,
# SEED (default 0) seeds the training, SCORE_ARGS adds bench/score_sources.py options.
#   R=/tmp/neu PRESET=tiny STEPS=300 TRAIN_ARGS="--img-size 64" bash bench/neu_unseen.sh   (cpu2-avx2: ~2 min a
#   model; ~6 at the preset's 128 px)
set -eu
R=${R:-runs/neu_unseen}; PRESET=${PRESET:-tiny}; STEPS=${STEPS:-300}; DEVICE=${DEVICE:-cpu}
KINDS=${KINDS:-"inclusion scratches patches rolled-in_scale"}
mkdir -p $R
for kind in $KINDS; do
  [ -d $R/$kind ] || python3 bench/neu_unseen.py --out $R/$kind --kinds $kind --train-goods 300 --test-goods 60 \
    >> $R/lines.jsonl
  for arm in ${ARMS:-base}; do
    args=""; [ $arm = dihedral ] && args="--dihedral-jitter"
    m=$R/${kind}_$arm${TAG:-}
    lineinspect train --data $R/$kind --preset $PRESET --steps $STEPS --time-budget 3600 --seed ${SEED:-0} \
      --device $DEVICE $args ${TRAIN_ARGS:-} --out $m 2> $m.log | tail -1 >> $R/train.jsonl
    lineinspect eval --model $m --data $R/$kind --device $DEVICE --json 2>> $R/eval.log | tail -1 >> $R/evals.jsonl
    python3 bench/score_sources.py $m $R/$kind --device $DEVICE ${SCORE_ARGS:-} --json $R/sources.jsonl \
      > $m.sources.txt 2>> $R/eval.log
    echo "$(date +%T) $kind $arm${TAG:-} done" >> $R/progress.txt
  done
done
