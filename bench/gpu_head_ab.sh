#!/usr/bin/env bash
# One device call: the Inspector with this checkout's files against older versions of some of them,
# kernel by kernel (bench/head_kernels.py) and whole (bench/gpu.py --only-inspector, new, old, new
# again, same machine); then with SERVE=1 l14 over gRPC (one camera, 32 cameras; naming K kinds, then unnamed); the CUDA
# tests; KERNELS=1 the head's kernels first, STAGES=1 bench/inspector_stages.py after the new Inspector, MOE=1
# the MoE layer last.
# OLD (default runs/ab_old, carried) holds the old files at their repo paths, e.g.
# `mkdir -p runs/ab_old/vision && git show REV:vision/heads.py > runs/ab_old/vision/heads.py`.
# CLASSES=K (default 7) makes the untrained head name K kinds, so its crop namer runs as a named line's does.
# Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
OLD=${OLD:-runs/ab_old}
K=${CLASSES:-7}
swapped=$(cd "$OLD" && find . -type f -name '*.py' | sed 's|^\./||')
# At most 8 files come back from $OUT: tables and test output go to the log, raw rows to one file per run.
inspector() {  # label: gpu.py --only-inspector into $OUT/inspector_<label>.jsonl, its table rows into the log
  timeout 150 python3 bench/gpu.py --only-inspector --classes "$K" --out "$OUT/inspector_$1.jsonl" > "/tmp/inspector_$1.txt" 2>&1
  grep "CUDA graphs b" "/tmp/inspector_$1.txt" | cut -c1-140 >> "$OUT/log.txt"
  log "inspector $1 done"
}
if [ -n "${KERNELS:-}" ]; then
  timeout 60 python3 bench/head_kernels.py --out "$OUT/head_kernels.jsonl" >> "$OUT/log.txt" 2>&1
  log kernels done
fi
inspector new
if [ -n "${STAGES:-}" ]; then  # where batches of 1 and 64 spend their time, and their kernels
  timeout 120 python3 bench/inspector_stages.py --preset l14 --classes "$K" --batches 1 64 --out "$OUT/stages.json" \
    > /tmp/stages.txt 2>&1
  grep -v Warning /tmp/stages.txt >> "$OUT/log.txt"
  log stages done
fi
mkdir -p /tmp/ab_new
for f in $swapped; do mkdir -p "/tmp/ab_new/$(dirname "$f")"; cp "$f" "/tmp/ab_new/$f"; cp "$OLD/$f" "$f"; done
inspector old
for f in $swapped; do cp "/tmp/ab_new/$f" "$f"; done
inspector new2  # new, old, new: the machine's drift shows
if [ -n "${SERVE:-}" ]; then  # l14 over gRPC, naming K kinds and unnamed
  S=${SERVE_SECONDS:-10}
  for k in "$K" 0; do
    timeout $((2 * S + 120)) python3 bench/serve_latency.py --preset l14 --classes "$k" --device cuda --streams 1 32 \
      --frames 100 --seconds "$S" --client-processes 4 --out "$OUT/serve_l14_k$k.json" 2>&1 | tail -9 >> "$OUT/log.txt"
    log "serve classes=$k done"
  done
fi
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/vision/test_ridges.py \
  tests/vision/test_crop_namer.py tests/vision/test_upsampling.py tests/vision/test_bandpass.py > /tmp/gpu_tests.txt 2>&1; tail -3 /tmp/gpu_tests.txt >> "$OUT/log.txt"
log tests done
if [ -n "${MOE:-}" ]; then
  timeout 90 python3 bench/gpu.py --only-moe --out "$OUT/moe.jsonl" > /tmp/moe.txt 2>&1
  log moe done
fi
