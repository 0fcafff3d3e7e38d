#!/usr/bin/env bash
# One device call for issue 5's GPU serving targets, run from the repo root on the GPU machine:
# CUDA-only tests, the MoE layer (bench/gpu.py --only-moe; GPU=all runs every section, GPU=vision the
# encoder, DefectModel and Inspector sections),
# the Inspector's stages (bench/inspector_stages.py), then l14 over gRPC: one camera, 32 cameras
# from client processes (cameras are other machines, so their clients should not share the
# server's GIL) (STREAMS="1 32"), and 32 cameras over server replicas on the one GPU (REPLICAS="4").
# SERVE_SECONDS per gRPC phase (default 15), REPLICA_SECONDS for the replica runs (the issue's sustained figure is 60). Results land in
# $OUT as they arrive, in few files (the device returns a limited number). Needs the cp312 wheels
# in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
S=${SERVE_SECONDS:-15}
RS=${REPLICA_SECONDS:-$S}
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/moe_lm \
  tests/vision/test_fp8.py tests/service/test_server.py > /tmp/gpu_tests.txt 2>&1; tail -5 /tmp/gpu_tests.txt >> "$OUT/log.txt"
log tests done
case "${GPU:-moe}" in  # which bench/gpu.py sections: all, vision (encoder, DefectModel, Inspector) or moe
  all) SECTIONS="--all" ;;
  vision) SECTIONS="--only-vision --only-inspector" ;;
  *) SECTIONS="--only-moe" ;;
esac
for SECTION in $SECTIONS; do
  [ "$SECTION" = --all ] && SECTION=""
  timeout 240 python3 bench/gpu.py $SECTION --out "$OUT/gpu_results.jsonl" >> "$OUT/gpu_table.txt" 2>&1
done
log gpu.py done
timeout 180 python3 bench/inspector_stages.py --preset l14 --device cuda --batches 1 16 32 64 \
  --out "$OUT/stages.json" >> "$OUT/log.txt" 2>&1
log stages done
timeout $((2 * S + 150)) python3 bench/serve_latency.py --preset l14 --device cuda --streams ${STREAMS:-1 32} --frames 100 \
  --seconds "$S" --client-processes 4 --out "$OUT/serve_l14.json" 2>&1 | tail -9 >> "$OUT/log.txt"
log "serve one server done"
for R in ${REPLICAS-4}; do  # REPLICAS="" skips the replica runs
  timeout $((RS + 300)) python3 bench/serve_latency.py --preset l14 --device cuda --streams 32 --frames 100 \
    --seconds "$RS" --client-processes 4 --replicas "$R" --decode-workers $((12 / R)) \
    --out "$OUT/serve_l14_replicas$R.json" 2>&1 | tail -3 >> "$OUT/log.txt"
  log "serve $R replicas done"
done
