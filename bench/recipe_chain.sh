#!/usr/bin/env bash
# The whole named-line recipe, one step after another under $R (default runs/recipe), on $DEVICE
# (default cpu): three synthetic metal lines (metal1 trains; metal2, metal3 are held out), the s14
# defect model with its namer (BUDGET s, NAMER s of it), `lineinspect eval` on both held-out lines (and
# bench/score_sources.py on all 250 good parts of each: goods.jsonl), the three language stages
# (LANGUAGE s; 0 leaves them out), then eval-language on both. Progress lines go to $R/progress.txt.
#   TRAIN_ARGS="..." more `lineinspect train` options for the defect model (default --dihedral-jitter: at a
#                    threshold for 4 % false rejects on each line's own goods it missed 1 / 0 defects of 175
#                    where the model without it missed 30 / 4, RESULTS session 22; TRAIN_ARGS="" leaves it out)
#   CAL="R1 R2 ..."  then, for each held-out line and each false-reject rate R, a copy of the model whose
#                    threshold `lineinspect calibrate` sets from that line's own 200 training good parts
#                    (which its test split does not contain: a shift's production sample) is evaluated
#                    again (eval and eval-language on the line's test split).
# Run directly on this CPU (`BUDGET=3000 NAMER=600 LANGUAGE=600 CAL="0.02 0.04" bash bench/recipe_chain.sh`);
# bench/gpu_recipe.sh sources it and runs the chain detached on a GPU machine.
R=${R:-runs/recipe}; DEVICE=${DEVICE:-cpu}

chain() {
  for seed in 1 2 3; do
    lineinspect synth --out $R/metal$seed --n 200 --seed $seed --surface metal > /dev/null &
  done
  wait
  echo "$(date +%T) synth done" >> $R/progress.txt
  lineinspect train --data $R/metal1 --preset s14 --device $DEVICE --time-budget ${BUDGET:-480} \
    --namer-seconds ${NAMER:-120} --name-pasted-kinds ${TRAIN_ARGS---dihedral-jitter} --out $R/m 2> $R/train.log | tail -1 > $R/train.jsonl
  echo "$(date +%T) train done" >> $R/progress.txt
  for line in metal2 metal3; do
    evaluate $R/m $line
    # the good parts flagged among all 250 of the line's (its 200 training goods are unseen too)
    python3 bench/score_sources.py $R/m $R/$line --with-train-goods --device $DEVICE --json $R/goods.jsonl \
      > /dev/null 2>> $R/eval.log
  done
  echo "$(date +%T) eval done" >> $R/progress.txt
  if [ "${LANGUAGE:-200}" != 0 ]; then
    lineinspect train --data $R/metal1 --out $R/m --stages 1,2,3 --device $DEVICE \
      --language-time-budget ${LANGUAGE:-200} 2> $R/language.log | tail -3 >> $R/train.jsonl
    echo "$(date +%T) language done" >> $R/progress.txt
    for line in metal2 metal3; do evaluate_language $R/m $line; done
  fi
  for rate in ${CAL:-}; do
    for line in metal2 metal3; do
      rm -rf $R/m_$line && cp -r $R/m $R/m_$line
      lineinspect calibrate --model $R/m_$line --good $R/$line/train/good --target-frr $rate --device $DEVICE \
        2>> $R/eval.log | tail -1 >> $R/calibrate.jsonl
      evaluate $R/m_$line $line
      [ "${LANGUAGE:-200}" = 0 ] || evaluate_language $R/m_$line $line
    done
    echo "$(date +%T) calibrated at $rate" >> $R/progress.txt
  done
  echo "$(date +%T) done" >> $R/progress.txt
}
evaluate() {  # model dir, line: the fast path on the line's test split
  lineinspect eval --model $1 --data $R/$2 --device $DEVICE --json 2>> $R/eval.log | tail -1 >> $R/evals.jsonl
}
evaluate_language() {  # model dir, line: the reports and answers on the line's test split
  lineinspect eval-language --model $1 --data $R/$2 --device $DEVICE --json 2>> $R/eval.log | tail -1 >> $R/language.jsonl
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  rm -rf $R; mkdir -p $R
  chain
  cat $R/progress.txt
fi
