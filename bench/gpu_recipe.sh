#!/usr/bin/env bash
# The named-line recipe of bench/recipe_chain.sh on a GPU machine, alone on it (BUDGET, NAMER, LANGUAGE,
# CAL as there). It outlasts one 10-minute device call, so it runs as a detached chain under
# runs/recipe/ and each call waits for it (WAIT s): the first call starts it (START=1), later calls on
# the same warm machine only wait; every call copies what has arrived to $OUT.
export R=runs/recipe DEVICE=cuda; WAIT=${WAIT:-560}
source "$(dirname "$0")/recipe_chain.sh"
if [ "${START:-0}" = 1 ]; then  # later calls leave the installed packages alone: the chain imports them
  source "$(dirname "$0")/gpu_setup.sh"
  rm -rf $R; mkdir -p $R
  export -f chain evaluate evaluate_language
  setsid bash -c chain > $R/chain.out 2>&1 < /dev/null &
fi
for _ in $(seq $((WAIT / 5))); do tail -1 $R/progress.txt 2>/dev/null | grep -qx "[0-9:]* done" && break; sleep 5; done
cp $R/progress.txt $R/*.jsonl $R/chain.out "$OUT"/ 2>/dev/null
tail -n 5 $R/train.log $R/language.log $R/eval.log > "$OUT/logs.txt" 2>/dev/null
cat $R/progress.txt
