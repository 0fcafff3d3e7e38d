#!/usr/bin/env bash
# One device call: s14 named on the synthetic metal line with uniform draws (--hard-share 0) against
# hard-example sampling (SHARES, default "0 0.5"), the trainings sharing the GPU for BUDGET seconds
# each (NAMER seconds of it for the namer), then `lineinspect eval` of each on two held-out lines
# (metal2, metal3): AUROC, F1, goods flagged and defects missed at the calibrated threshold.
source "$(dirname "$0")/gpu_setup.sh"
B=${BUDGET:-390}; N=${NAMER:-100}
R=runs/hard; mkdir -p $R
synthetic_lines $R
lineinspect synth --out $R/metal3 --n 200 --seed 3 --surface metal > /dev/null
log synth done
for share in ${SHARES:-0 0.5}; do
  ( name=h$share
    timeout $((B + 150)) lineinspect train --data $R/metal1 --preset s14 --device cuda --time-budget $B \
      --namer-seconds $N --name-pasted-kinds --hard-share $share --out $R/$name 2> $R/$name.log | tail -1 >> "$OUT/train.jsonl"
    log "train $name done"
    for line in metal2 metal3; do
      echo "{\"run\": \"$name\", \"data\": \"$line\", \"result\": $(lineinspect eval --model $R/$name --data $R/$line \
        --device cuda --json 2>>$R/eval.log | tail -1)}" >> "$OUT/evals.jsonl"
    done
    log "eval $name done" ) &
done
wait
tail -n 3 $R/*.log > "$OUT/train_logs.txt" 2>&1
log done
