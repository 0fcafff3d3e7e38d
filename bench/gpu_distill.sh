#!/usr/bin/env bash
# One device call for issue 5's edge path and issue 2's GPU figures, from the repo root on the GPU
# machine: an l14 teacher, an s14 trained alone (the control) and an s14 distilled from the teacher
# on the synthetic line, an s14 on NEU-DET; then each s14 quantised to int8 and evaluated on the
# machine's CPU (where int8 runs). Every eval's JSON line lands in $OUT/evals.jsonl as it arrives.
source "$(dirname "$0")/gpu_setup.sh"
B=${BUDGET:-180}
R=runs/distill; mkdir -p $R
synthetic_lines $R
evaluate() {  # name model data device
  echo "{\"run\": \"$1\", \"result\": $(lineinspect eval --model $2 --data $3 --device $4 --json 2>>$R/eval.log | tail -1)}" \
    >> "$OUT/evals.jsonl"
  log "eval $1 done"
}
train() {  # name data preset extra...
  local name=$1 data=$2 preset=$3; shift 3
  timeout $((B + 120)) lineinspect train --data $data --preset $preset --device cuda --time-budget $B --out $R/$name "$@" \
    2> $R/$name.log | tail -1 >> "$OUT/train.jsonl"
}
train l14_teacher $R/metal1 l14 &
train s14_control $R/metal1 s14 &
train s14_neu .gpu_data/neu-det s14 &
wait
log phase 1 trained
timeout $((B + 120)) lineinspect distill --teacher $R/l14_teacher --data $R/metal1 --preset s14 --device cuda \
  --time-budget $B --out $R/s14_distilled 2> $R/s14_distilled.log | tail -1 >> "$OUT/train.jsonl" &
data_of() { case $1 in *neu*) echo .gpu_data/neu-det;; *) echo $R/metal2;; esac; }
quantize() {  # model: int8 copy, checked against strict fp32 on the test split
  lineinspect quantize --model $R/$1 --out $R/${1}_int8 --calibration-data $(data_of $1) \
    >> "$OUT/quantize.jsonl" 2>> $R/quantize.log
}
for m in s14_control s14_neu; do quantize $m; done
for m in l14_teacher s14_control s14_neu; do evaluate $m $R/$m $(data_of $m) cuda; done
for m in s14_control_int8 s14_neu_int8; do evaluate $m $R/$m $(data_of $m) cpu & done
wait
log phase 2 done
quantize s14_distilled
evaluate s14_distilled $R/s14_distilled $R/metal2 cuda
evaluate s14_distilled_int8 $R/s14_distilled_int8 $R/metal2 cpu
log done
tail -n 5 $R/*.log > "$OUT/train_logs.txt" 2>&1
