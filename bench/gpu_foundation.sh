#!/usr/bin/env bash
# One device call for the foundation issue: l14 training steps, GPU-trained accuracy on the
# synthetic line and on NEU-DET, and a CPU-core sweep of tiny variants (2 threads each).
# Run from the repo root on the GPU machine; every result is appended to $OUT as it arrives.
source "$(dirname "$0")/gpu_setup.sh"
R=runs/gpu1; mkdir -p $R
synthetic_lines $R
log synth done
# 1) ViT-L/14 builds and trains on the H200: ms per step and peak memory (alone on the GPU).
timeout 150 lineinspect train --data $R/metal1 --preset l14 --device cuda --steps 20 --batch-size 32 --out $R/l14 2> $R/l14.log | tail -1
python3 -c "import json; t=json.load(open('$R/l14/config.json'))['training']; print('L14', json.dumps({k: t[k] for k in ('ms_per_step','peak_gpu_memory_gb','steps','seconds','wall_seconds')}))" 2>&1 | tee -a "$OUT/log.txt"
log l14 done
# 2) GPU-trained s14 (synthetic, NEU-DET) and 3) a CPU sweep of tiny variants, all at once.
S="timeout 330 python3 bench/accuracy_sweep.py"
$S --train $R/metal1 --test $R/metal2 --budget 200 --out $R/gpu_metal --variant s14_gpu preset=s14,device=cuda > $OUT/gpu_metal.txt 2>&1 &
$S --train .gpu_data/neu-det --test .gpu_data/neu-det --budget 200 --out $R/gpu_neu --variant neu_s14 preset=s14,device=cuda > $OUT/gpu_neu.txt 2>&1 &
$S --train $R/metal1 --test $R/metal2 --budget 150 --threads 2 --out $R/cpu_sweep \
  --variant base preset=tiny --variant p16 preset=tiny,patch_size=16 --variant nossl preset=tiny,ssl_fraction=0 \
  --variant lr3 preset=tiny,lr=0.003 > $OUT/cpu_sweep.txt 2>&1 &
wait
log sweeps done
tail -n 30 $R/gpu_neu/*.log > $OUT/neu_train_log.txt 2>&1
cat $OUT/gpu_metal.txt $OUT/gpu_neu.txt $OUT/cpu_sweep.txt | grep -v "step\]"
