#!/usr/bin/env bash
# A/B of a `lineinspect train` option on the synthetic metal line, per seed: the same defect training
# (PRESET, STEPS, DEVICE) without and with B_ARGS (arm B_NAME; default --dihedral-jitter, "dihedral") on
# metal1, then bench/score_sources.py on each
# held-out line with its training goods (250 unseen good parts, 175 defects): image AUROC per score
# source, good parts flagged at 95 / 97.5 % defect recall and at the model's own threshold.
#   R=/tmp/ab PRESET=tiny STEPS=300 SEEDS="0 1" bash bench/metal_ab.sh   (cpu2-avx2: ~15 min a seed)
#   B_ARGS="--streak-share 0.3" B_NAME=streak R=/tmp/ab bash bench/metal_ab.sh
# Figures: $R/goods.jsonl (one JSON line per model and line), the tables in $R/<model>_<line>.txt.
set -eu
R=${R:-runs/metal_ab}; B_ARGS=${B_ARGS:---dihedral-jitter}; B_NAME=${B_NAME:-dihedral}; PRESET=${PRESET:-tiny}; STEPS=${STEPS:-300}; DEVICE=${DEVICE:-cpu}
mkdir -p $R
for seed in 1 2 3; do
  [ -d $R/metal$seed ] || lineinspect synth --out $R/metal$seed --n 200 --seed $seed --surface metal > /dev/null
done
for seed in ${SEEDS:-0}; do
  for arm in base $B_NAME; do
    args=""; [ $arm = $B_NAME ] && args="$B_ARGS"
    lineinspect train --data $R/metal1 --preset $PRESET --steps $STEPS --seed $seed --device $DEVICE $args \
      --out $R/${arm}_s$seed 2> $R/${arm}_s$seed.log | tail -1 >> $R/train.jsonl
    for line in metal2 metal3; do
      python3 bench/score_sources.py $R/${arm}_s$seed $R/$line --with-train-goods --device $DEVICE \
        --json $R/goods.jsonl > $R/${arm}_s${seed}_$line.txt 2>> $R/score.log
    done
  done
done
