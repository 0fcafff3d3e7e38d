#!/usr/bin/env bash
# One device call for issue 5's GPU serving targets, run from the repo root on the GPU machine:
# CUDA-only tests, bench/gpu.py (every GPU measurement), then l14 over gRPC with the Inspector's
# CUDA graphs against its eager path (the baseline) in the same call. Results land in $OUT as
# they arrive. Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/moe_lm/test_experts.py \
  tests/vision/test_fp8.py > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt" | tee -a "$OUT/log.txt"
log tests done
timeout 240 python3 bench/gpu.py --out "$OUT/gpu_results.jsonl" > "$OUT/gpu_table.txt" 2>&1
log gpu.py done
timeout 150 python3 bench/serve_latency.py --preset l14 --device cuda --streams 1 32 --frames 100 \
  --out "$OUT/serve_l14_graphs.json" > "$OUT/serve_l14_graphs.txt" 2>&1
log serve graphs done
timeout 90 python3 bench/serve_latency.py --preset l14 --device cuda --no-cuda-graphs --streams 1 --frames 100 \
  --out "$OUT/serve_l14_eager.json" > "$OUT/serve_l14_eager.txt" 2>&1
log serve eager done
