#!/usr/bin/env bash
# One device call for issue 2's GPU accuracy figures, from the repo root on the GPU machine: s14 on
# NEU-DET, s14 on the synthetic metal line, s14 on the same line with generic pasting only (all
# seven defect types unseen), s14 naming the pasted kinds on that line, and s14 on NEU-DET without
# the ridge filters (s14_neu_noridges, the ablation), and s14 naming with the namer's crops cut around
# jittered masks instead of where the model finds them (s14_metal_named_maskcrops); trainings share the
# H200 (BUDGET=seconds per training, RUNS=the names to run, by default the first three).
# EXTRA=more train arguments for every run (e.g. "--seed 1"). Every eval's JSON line lands in $OUT/evals.jsonl as it arrives. LANGUAGE=seconds also trains the
# language stages on the s14_metal_named* runs and writes eval-language's line to $OUT/language.jsonl.
source "$(dirname "$0")/gpu_setup.sh"
B=${BUDGET:-300}
R=runs/accuracy; mkdir -p $R
synthetic_lines $R
log synth done
run() {  # name train_data test_data extra-train-args...
  local name=$1 data=$2 test=$3; shift 3
  rm -rf $R/$name  # a warm machine keeps runs/ from an earlier call
  timeout $((B + 150)) lineinspect train --data $data --preset s14 --device cuda --time-budget $B --out $R/$name "$@" ${EXTRA:-} \
    2> $R/$name.log | tail -1 >> "$OUT/train.jsonl"
  log "train $name done"
  echo "{\"run\": \"$name\", \"result\": $(lineinspect eval --model $R/$name --data $test --device cuda --json 2>>$R/eval.log | tail -1)}" \
    >> "$OUT/evals.jsonl"
  log "eval $name done"
  if grep -q name-pasted-kinds <<< "$*"; then  # where the namer confuses the kinds (map crops vs true masks)
    python3 bench/namer_confusion.py $R/$name $test --device cuda >> "$OUT/namer.jsonl" 2>>$R/eval.log
  fi
}
language() {  # name: the three language stages on that model, then eval-language (LANGUAGE=seconds, 0 = skip)
  local name=$1 L=${LANGUAGE:-0}
  [ "$L" -gt 0 ] || return 0
  lineinspect train --data $R/metal1 --out $R/$name --stages 1,2,3 --device cuda --language-time-budget $L \
    2> $R/$name.language.log | tail -3 >> "$OUT/train.jsonl"
  echo "{\"run\": \"$name language\", \"result\": $(lineinspect eval-language --model $R/$name --data $R/metal2 \
    --device cuda --json 2>>$R/eval.log | tail -1)}" >> "$OUT/language.jsonl"
  log "language $name done"
}
RUNS=${RUNS:-"s14_neu s14_metal s14_metal_unseen"}  # which to train
for name in $RUNS; do
  case $name in
    s14_neu) run s14_neu .gpu_data/neu-det .gpu_data/neu-det & ;;
    s14_neu_noridges) run s14_neu_noridges .gpu_data/neu-det .gpu_data/neu-det --no-ridges & ;;
    s14_metal) run s14_metal $R/metal1 $R/metal2 & ;;
    s14_metal_unseen) run s14_metal_unseen $R/metal1 $R/metal2 --paste-types none & ;;
    s14_metal_named) (run s14_metal_named $R/metal1 $R/metal2 --name-pasted-kinds && language s14_metal_named) & ;;
    s14_metal_named_maskcrops) (run s14_metal_named_maskcrops $R/metal1 $R/metal2 --name-pasted-kinds \
      --namer-regions mask && language s14_metal_named_maskcrops) & ;;
  esac
done
wait
tail -n 5 $R/*.log > "$OUT/train_logs.txt" 2>&1
log done
