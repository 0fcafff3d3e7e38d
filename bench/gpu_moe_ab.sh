#!/usr/bin/env bash
# One device call: the MoE layer (bench/gpu.py --only-moe) and l14 generation (--only-generation)
# (GENERATION=1, not in the third run) with this checkout's moe_lm against older versions of some of its files, new, old, new again on
# the same machine (the drift shows); then the CUDA tests of moe_lm.
# OLD (default runs/ab_old, carried) holds the old files at their repo paths, e.g.
# `mkdir -p runs/ab_old/moe_lm && git show REV:moe_lm/moe.py > runs/ab_old/moe_lm/moe.py`.
# Needs the cp312 wheels in .whl/ (bench/gpu_setup.sh installs them).
source "$(dirname "$0")/gpu_setup.sh"
OLD=${OLD:-runs/ab_old}
swapped=$(cd "$OLD" && find . -type f -name '*.py' | sed 's|^\./||')
run() {  # label: the MoE layer and generation into $OUT/moe_<label>.jsonl, the ratio rows into the log
  timeout 120 python3 bench/gpu.py --only-moe --out "$OUT/moe_$1.jsonl" > "/tmp/moe_$1.txt" 2>&1
  grep -E "/ dense|CUDA graph \||element-wise \||tok fwd, CUDA graph|GEMMs? \|" "/tmp/moe_$1.txt" | cut -c1-150 >> "$OUT/log.txt"
  log "$1 done"
  if [ -n "${GENERATION:-}" ] && [ "$1" != new2 ]; then  # l14 report generation, batches 1 and 32
    timeout 150 python3 bench/gpu.py --only-generation --gen-batches 1 32 --out "$OUT/moe_$1.jsonl" > "/tmp/gen_$1.txt" 2>&1
    grep -i "generate" "/tmp/gen_$1.txt" | cut -c1-200 >> "$OUT/log.txt"
    log "$1 generation done"
  fi
}
run new
mkdir -p /tmp/ab_new
for f in $swapped; do mkdir -p "/tmp/ab_new/$(dirname "$f")"; cp "$f" "/tmp/ab_new/$f"; cp "$OLD/$f" "$f"; done
run old
for f in $swapped; do cp "/tmp/ab_new/$f" "$f"; done
run new2
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/moe_lm > /tmp/moe_tests.txt 2>&1
tail -3 /tmp/moe_tests.txt >> "$OUT/log.txt"
log tests done
