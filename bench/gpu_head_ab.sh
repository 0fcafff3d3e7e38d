#!/usr/bin/env bash
# One device call: the head's FFT line filters against the direct convolution (vision/ridges.py as of
# OLD=runs/ab_old, carried; e.g. `git show REV:vision/ridges.py > runs/ab_old/ridges.py`),
# kernel by kernel (bench/head_kernels.py) and as the whole Inspector (bench/gpu.py --only-inspector,
# new then old, same machine); then the CUDA tests, and with SERVE=1 l14 over gRPC (one camera, 32
# cameras) and the MoE layer. Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
OLD=${OLD:-runs/ab_old}
timeout 60 python3 bench/head_kernels.py --out "$OUT/head_kernels.jsonl" >> "$OUT/log.txt" 2>&1
log kernels done
timeout 150 python3 bench/gpu.py --only-inspector --out "$OUT/inspector_new.jsonl" > "$OUT/inspector_new.txt" 2>&1
log inspector new done
cp vision/ridges.py /tmp/ && cp "$OLD"/ridges.py vision/
timeout 150 python3 bench/gpu.py --only-inspector --out "$OUT/inspector_old.jsonl" > "$OUT/inspector_old.txt" 2>&1
cp /tmp/ridges.py vision/
log inspector old done
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/vision/test_ridges.py > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt" >> "$OUT/log.txt"
log tests done
if [ -n "${SERVE:-}" ]; then  # l14 over gRPC and the MoE layer, when the call has time for them
  S=${SERVE_SECONDS:-10}
  timeout $((2 * S + 120)) python3 bench/serve_latency.py --preset l14 --device cuda --streams 1 32 --frames 100 \
    --seconds "$S" --client-processes 4 --out "$OUT/serve_l14.json" 2>&1 | tail -9 >> "$OUT/log.txt"
  log serve done
  timeout 90 python3 bench/gpu.py --only-moe --out "$OUT/moe.jsonl" > "$OUT/moe.txt" 2>&1
  log moe done
fi
