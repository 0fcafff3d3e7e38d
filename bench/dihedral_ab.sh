#!/usr/bin/env bash
# A/B of `lineinspect train --dihedral-jitter` on the synthetic metal line, per seed: the same defect
# training (PRESET, STEPS, DEVICE) with and without it on metal1, then bench/score_sources.py on each
# held-out line with its training goods (250 unseen good parts, 175 defects): image AUROC per score
# source, good parts flagged at 95 / 97.5 % defect recall and at the model's own threshold.
#   R=/tmp/ab PRESET=tiny STEPS=300 SEEDS="0 1" bash bench/dihedral_ab.sh   (cpu2-avx2: ~15 min a seed)
# Figures: $R/goods.jsonl (one JSON line per model and line), the tables in $R/<model>_<line>.txt.
set -eu
R=${R:-runs/dihedral_ab}; PRESET=${PRESET:-tiny}; STEPS=${STEPS:-300}; DEVICE=${DEVICE:-cpu}
mkdir -p $R
for seed in 1 2 3; do
  [ -d $R/metal$seed ] || lineinspect synth --out $R/metal$seed --n 200 --seed $seed --surface metal > /dev/null
done
for seed in ${SEEDS:-0}; do
  for arm in base dihedral; do
    args=""; [ $arm = dihedral ] && args="--dihedral-jitter"
    lineinspect train --data $R/metal1 --preset $PRESET --steps $STEPS --seed $seed --device $DEVICE $args \
      --out $R/${arm}_s$seed 2> $R/${arm}_s$seed.log | tail -1 >> $R/train.jsonl
    for line in metal2 metal3; do
      python3 bench/score_sources.py $R/${arm}_s$seed $R/$line --with-train-goods --device $DEVICE \
        --json $R/goods.jsonl > $R/${arm}_s${seed}_$line.txt 2>> $R/score.log
    done
  done
done
