#!/usr/bin/env bash
# The whole named-line recipe on the GPU, alone on it: s14 defect model with its namer (BUDGET s,
# NAMER s of it), `lineinspect eval` on two held-out lines, the three language stages (LANGUAGE s),
# then eval-language on both lines. It outlasts one 10-minute device call, so it runs as a detached
# chain under runs/recipe/ and each call waits for it: the first call starts it (START=1), later
# calls on the same warm machine only wait; every call copies what has arrived to $OUT.
R=runs/recipe; WAIT=${WAIT:-560}
chain() {
  synthetic_lines $R && lineinspect synth --out $R/metal3 --n 200 --seed 3 --surface metal > /dev/null
  echo "$(date +%T) synth done" >> $R/progress.txt
  lineinspect train --data $R/metal1 --preset s14 --device cuda --time-budget ${BUDGET:-480} \
    --namer-seconds ${NAMER:-120} --name-pasted-kinds --out $R/m 2> $R/train.log | tail -1 > $R/train.jsonl
  echo "$(date +%T) train done" >> $R/progress.txt
  for line in metal2 metal3; do
    lineinspect eval --model $R/m --data $R/$line --device cuda --json 2>> $R/eval.log | tail -1 >> $R/evals.jsonl
  done
  echo "$(date +%T) eval done" >> $R/progress.txt
  lineinspect train --data $R/metal1 --out $R/m --stages 1,2,3 --device cuda --language-time-budget ${LANGUAGE:-200} \
    2> $R/language.log | tail -3 >> $R/train.jsonl
  echo "$(date +%T) language done" >> $R/progress.txt
  for line in metal2 metal3; do
    lineinspect eval-language --model $R/m --data $R/$line --device cuda --json 2>> $R/eval.log | tail -1 >> $R/language.jsonl
  done
  echo "$(date +%T) done" >> $R/progress.txt
}
if [ "${START:-0}" = 1 ]; then  # later calls leave the installed packages alone: the chain imports them
  source "$(dirname "$0")/gpu_setup.sh"
  rm -rf $R; mkdir -p $R
  export -f chain synthetic_lines; export R
  setsid bash -c chain > $R/chain.out 2>&1 < /dev/null &
fi
for _ in $(seq $((WAIT / 5))); do tail -1 $R/progress.txt 2>/dev/null | grep -qx "[0-9:]* done" && break; sleep 5; done
cp $R/progress.txt $R/*.jsonl $R/chain.out "$OUT"/ 2>/dev/null
tail -n 5 $R/train.log $R/language.log $R/eval.log > "$OUT/logs.txt" 2>/dev/null
cat $R/progress.txt
