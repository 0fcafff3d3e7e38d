#!/usr/bin/env bash
# One device call: what the memory bank's search costs `l14` on the GPU in each search mode
# (bench/bank_cost.py), `s14` trained on the real-steel lines (bench/neu_unseen.sh, carried in
# .gpu_data/neu_unseen) with each mode's score change on those trained banks (bench/bank_rounding.py),
# then the MoE rows of bench/gpu.py. Raw rows under $OUT, progress in $OUT/log.txt.
#   carry: .whl .gpu_data/neu_unseen
source "$(dirname "$0")/gpu_setup.sh"
timeout 120 python3 bench/bank_cost.py --preset l14 --device cuda --bank 8192 4096 2048 --batches 1 64 \
  --searches exact tf32 bf16_refine > "$OUT/bank_cost_l14.jsonl" 2> /tmp/bank_cost.err || tail -5 /tmp/bank_cost.err >> "$OUT/log.txt"
log bank_cost done
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/vision/test_cuda_graphs.py tests/vision/test_region_stats.py \
  tests/vision/test_defect_model.py > "$OUT/vision_tests.txt" 2>&1; tail -1 "$OUT/vision_tests.txt" >> "$OUT/log.txt"
R=/tmp/neu_unseen; rm -rf $R; cp -r .gpu_data/neu_unseen $R
R=$R KINDS="${KINDS:-patches rolled-in_scale inclusion scratches}" PRESET=s14 STEPS=${STEPS:-300} SEED=${SEED:-2} \
  DEVICE=cuda TAG=_s14 SCORE_ARGS="--per-image --marked-goods bench/neu_unseen_marked_goods.json" \
  TRAIN_ARGS="--img-size 112 --streak-share 0.3" timeout ${NEU_LIMIT:-270} bash bench/neu_unseen.sh || log neu_unseen cut
cp $R/*.jsonl $R/progress.txt "$OUT/" 2> /dev/null
for m in $R/*_base_s14; do
  [ -f $m/config.json ] || continue
  kind=$(basename $m _base_s14)
  timeout 60 python3 bench/bank_rounding.py $m $R/$kind --device cuda --searches tf32 bf16_refine \
    >> "$OUT/bank_rounding_cuda.jsonl" 2>> "$OUT/log.txt"
done
log bank_rounding done
timeout ${MOE_LIMIT:-100} python3 bench/gpu.py --only-moe --out "$OUT/gpu_moe.jsonl" > "$OUT/gpu_moe.txt" 2>&1 || log moe cut
log all done
