#!/usr/bin/env bash
# One device call: the fused gate-up kernel of the MoE layer (bench/moe_fused_gemm.py: the stage alone per
# tile config against today's, then the layer with it off and on against the dense SwiGLU), then the CUDA
# tests of moe_lm. Raw rows in $OUT/moe_fused_gemm.jsonl, the table and test summary in $OUT/log.txt.
# Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
if [ "${STAGE:-1}" = 1 ]; then  # STAGE=0 skips the gate-up stage's tile sweep (~4 min)
  timeout 240 python3 bench/moe_fused_gemm.py --out "$OUT/moe_fused_gemm.jsonl" > /tmp/moe_fused_gemm.txt 2>&1 \
    || tail -20 /tmp/moe_fused_gemm.txt >> "$OUT/log.txt"
  sed -n '/^| measurement/,$p' /tmp/moe_fused_gemm.txt | cut -c1-220 >> "$OUT/log.txt"
  log bench done
fi
timeout 120 python3 bench/gpu.py --only-moe --out "$OUT/gpu_moe.jsonl" > /tmp/gpu_moe.txt 2>&1 || tail -20 /tmp/gpu_moe.txt >> "$OUT/log.txt"
cp /tmp/gpu_moe.txt "$OUT/"
log gpu.py moe done
timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider tests/moe_lm > /tmp/moe_tests.txt 2>&1
grep -E "FAILED|ERROR|passed|failed" /tmp/moe_tests.txt | tail -12 >> "$OUT/log.txt"
log tests done
