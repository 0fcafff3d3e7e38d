#!/usr/bin/env bash
# One device call: how fast `s14` trains on the synthetic metal line with the named defects painted in
# one process (--render-workers 0) against the default pool (all cores but two, up to 8), one training
# after the other, alone on the GPU: BUDGET seconds each (NAMER of them for the namer). Prints each run's
# defect steps, ms per step, namer steps and examples (from the model directory's config.json).
source "$(dirname "$0")/gpu_setup.sh"
B=${BUDGET:-100}; N=${NAMER:-40}
R=runs/render; mkdir -p $R
lineinspect synth --out $R/metal1 --n 200 --seed 1 --surface metal > /dev/null
log synth done
for workers in ${WORKERS:-0 auto}; do
  flag=$([ "$workers" = auto ] || echo "--render-workers $workers")
  lineinspect train --data $R/metal1 --preset s14 --device cuda --time-budget $B --namer-seconds $N \
    --name-pasted-kinds $flag --out $R/w$workers 2> $R/w$workers.log > /dev/null
  python3 - $R/w$workers <<'PY' | tee -a "$OUT/render_workers.jsonl"
import json, sys
c = json.load(open(f"{sys.argv[1]}/config.json"))
t, notes = c["training"], c["calibration"]["notes"]
print(json.dumps({"run": sys.argv[1], "render_workers": t.get("render_workers"), "steps": t["steps"],
                  "ms_per_step": t["ms_per_step"], "seconds": t["seconds"], "namer_steps": notes.get("namer_steps"),
                  "namer_examples": notes.get("namer_examples"), "namer_heldout": notes.get("namer_heldout_accuracy")}))
PY
  log "workers $workers done"
done
