#!/usr/bin/env bash
# One device call for issue 2's GPU accuracy figures, from the repo root on the GPU machine: s14 on
# NEU-DET, s14 on the synthetic metal line, s14 on the same line with generic pasting only (all
# seven defect types unseen), and s14 naming the pasted kinds on that line; trainings share the
# H200 (BUDGET=seconds per training, RUNS=the names to run, by default the first three).
# Every eval's JSON line lands in $OUT/evals.jsonl as it arrives.
source "$(dirname "$0")/gpu_setup.sh"
B=${BUDGET:-300}
R=runs/accuracy; mkdir -p $R
synthetic_lines $R
log synth done
run() {  # name train_data test_data extra-train-args...
  local name=$1 data=$2 test=$3; shift 3
  timeout $((B + 150)) lineinspect train --data $data --preset s14 --device cuda --time-budget $B --out $R/$name "$@" \
    2> $R/$name.log | tail -1 >> "$OUT/train.jsonl"
  log "train $name done"
  echo "{\"run\": \"$name\", \"result\": $(lineinspect eval --model $R/$name --data $test --device cuda --json 2>>$R/eval.log | tail -1)}" \
    >> "$OUT/evals.jsonl"
  log "eval $name done"
}
RUNS=${RUNS:-"s14_neu s14_metal s14_metal_unseen"}  # which to train
for name in $RUNS; do
  case $name in
    s14_neu) run s14_neu .gpu_data/neu-det .gpu_data/neu-det & ;;
    s14_metal) run s14_metal $R/metal1 $R/metal2 & ;;
    s14_metal_unseen) run s14_metal_unseen $R/metal1 $R/metal2 --paste-types none & ;;
    s14_metal_named) run s14_metal_named $R/metal1 $R/metal2 --name-pasted-kinds & ;;
  esac
done
wait
tail -n 5 $R/*.log > "$OUT/train_logs.txt" 2>&1
log done
