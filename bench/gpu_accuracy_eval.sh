#!/usr/bin/env bash
# Evaluate the models that bench/gpu_accuracy.sh trained (runs/accuracy on a still-warm GPU machine),
# then run the CUDA-only tests. Every eval's JSON line lands in $OUT/evals.jsonl.
source "$(dirname "$0")/gpu_setup.sh"
R=runs/accuracy
for name in s14_neu s14_metal s14_metal_unseen; do
  case $name in *neu*) test=.gpu_data/neu-det;; *) test=$R/metal2;; esac
  echo "{\"run\": \"$name\", \"result\": $(lineinspect eval --model $R/$name --data $test --device cuda --json 2>>$R/eval.log | tail -1)}" \
    >> "$OUT/evals.jsonl"
  log "eval $name done"
done
tail -n 20 $R/eval.log > "$OUT/eval_log.txt"
python3 -m pytest -q tests/vision/test_cuda_graphs.py tests/vision/test_bandpass.py 2>&1 | tail -3 | tee -a "$OUT/log.txt"
