#!/usr/bin/env bash
# One device call: the CUDA-only tests, with the language stages of a carried CPU-trained model trained
# on the GPU beside them (MODEL=runs/gpu_models/NAME, LANGUAGE=seconds; is the H200's low location
# accuracy from training the language part on the GPU?), then every bench/gpu.py section and l14 over
# gRPC with one server (one camera, then 32 cameras from client processes, SERVE_SECONDS each).
# Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them) and MODEL carried.
source "$(dirname "$0")/gpu_setup.sh"
language_on_gpu() {  # the carried model's three language stages on the GPU, then eval-language there
  local copy=runs/gpu_language/$(basename "$MODEL")
  mkdir -p runs/gpu_language && rm -rf "$copy" && cp -r "$MODEL" "$copy"
  synthetic_lines runs/gpu_language
  lineinspect train --data runs/gpu_language/metal1 --out "$copy" --stages 1,2,3 --device cuda \
    --language-time-budget "${LANGUAGE:-90}" 2> runs/gpu_language/train.log | tail -3 > "$OUT/language_train.jsonl"
  lineinspect eval-language --model "$copy" --data runs/gpu_language/metal2 --device cuda --json \
    2> runs/gpu_language/eval.log | tail -1 > "$OUT/language_eval.json"
  tail -5 runs/gpu_language/*.log > "$OUT/language_logs.txt"
  log "language on the GPU done"
}
[ -n "${MODEL:-}" ] && language_on_gpu &
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/moe_lm \
  tests/vision/test_fp8.py tests/service/test_server.py > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt" >> "$OUT/log.txt"
log tests done
wait
timeout 200 python3 bench/gpu.py --out "$OUT/gpu_results.jsonl" > "$OUT/gpu_table.txt" 2>&1
log gpu.py done
S=${SERVE_SECONDS:-15}
timeout $((2 * S + 150)) python3 bench/serve_latency.py --preset l14 --device cuda --streams 1 32 --frames 100 \
  --seconds "$S" --client-processes 4 --out "$OUT/serve_l14.json" 2>&1 | tail -9 >> "$OUT/log.txt"
log serve done
