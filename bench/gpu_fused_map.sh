#!/usr/bin/env bash
# Device calls for the served fused map (session 27). PART=steel: the CUDA tests of vision (the region
# map under real CUDA graphs), then `s14` on the four real-steel lines (bench/neu_unseen.sh, carried in
# .gpu_data/neu_unseen): image and pixel AUROC of the served score and map. PART=serve: `l14` trained a
# few steps on the synthetic metal line, served over gRPC (one camera, then 32) with the fused score and
# map, and the same model with the head's score and map (a copy of its directory).
#   carry: .whl .gpu_data/neu_unseen
source "$(dirname "$0")/gpu_setup.sh"
case "${PART:-steel}" in
steel)
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/vision/test_region_stats.py \
    > "$OUT/vision_tests.txt" 2>&1; tail -1 "$OUT/vision_tests.txt" >> "$OUT/log.txt"
  R=/tmp/neu_unseen; rm -rf $R; cp -r .gpu_data/neu_unseen $R
  R=$R KINDS="${KINDS:-patches rolled-in_scale inclusion scratches}" PRESET=s14 STEPS=${STEPS:-300} SEED=${SEED:-2} \
    DEVICE=cuda TAG=_s14 SCORE_ARGS="--per-image --marked-goods bench/neu_unseen_marked_goods.json" \
    TRAIN_ARGS="--img-size 112 --streak-share 0.3" timeout ${NEU_LIMIT:-300} bash bench/neu_unseen.sh || log neu_unseen cut
  cp $R/evals.jsonl $R/sources.jsonl $R/progress.txt "$OUT/" 2> /dev/null
  tail -5 $R/eval.log >> "$OUT/log.txt"
  ;;
serve)
  R=/tmp/lines; synthetic_lines $R
  timeout 200 lineinspect train --data $R/metal1 --preset l14 --device cuda --steps ${STEPS:-20} --batch-size 32 \
    --namer-seconds 0 --score-source fused --out $R/l14 2> $R/l14.log | tail -1 >> "$OUT/log.txt"
  python3 - $R/l14 <<'PY'
import json, shutil, sys
head = sys.argv[1] + "_head"
shutil.copytree(sys.argv[1], head)
config = json.load(open(f"{head}/config.json"))
config["calibration"].update(score_source="head", map_source="head")
json.dump(config, open(f"{head}/config.json", "w"))
PY
  grep -o '"score_source": "[a-z]*"\|"map_source": "[a-z]*"' $R/l14/config.json >> "$OUT/log.txt"
  for M in l14 l14_head; do
    timeout 150 python3 bench/serve_latency.py --model $R/$M --device cuda --streams 1 32 --frames 100 \
      --seconds ${SERVE_SECONDS:-15} --client-processes 4 --out "$OUT/serve_$M.json" 2>&1 | tail -4 >> "$OUT/log.txt"
    log "serve $M done"
  done
  ;;
esac
log all done
