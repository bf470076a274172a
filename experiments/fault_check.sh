#!/bin/bash
# Faults on a sequence the tests never use (SENT/sst2 -> SENT/imdb, built from ../shared by
# build_sentiment_domains.py), checkpoints only at task ends: an uninterrupted run; a run stopped by SIGTERM
# 25 s into its first task, then resumed; a run killed in its second task whose newest checkpoint is then
# truncated to half, then resumed. Prints the exit codes, the time to exit after SIGTERM and the three
# runs' parameter digests (equal digests: bit-identical parameters). About 15 minutes on 2 idle cores.
#   bash experiments/fault_check.sh [DATA_DIR] [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
DATA=${1:-/tmp/sent_domains}
OUT=${2:-/tmp/fault_check}
[ -d "$DATA/SENT/sst2" ] || .venv/bin/python experiments/build_sentiment_domains.py --out "$DATA"
mkdir -p "$OUT"
RUN=".venv/bin/migu-jax run --model minilm --data-dir $DATA --order SENT/sst2,SENT/imdb --methods migu --train-per-class 128 --max-test 20 --lr 1e-4 --checkpoint-every 100000 --no-plots"
rm -rf $OUT/whole $OUT/stopped $OUT/damaged
echo "== uninterrupted"; $RUN --output $OUT/whole > $OUT/whole.log 2>&1; echo "rc $?"
echo "== SIGTERM 25 s into the first task"
$RUN --output $OUT/stopped > $OUT/stopped.log 2>&1 &
pid=$!
until grep -q "task 1/2" $OUT/stopped.log 2>/dev/null; do sleep 0.2; done
sleep 25; sent=$(date +%s.%N); kill -TERM $pid; wait $pid; rc=$?
echo "rc $rc, exited $(python3 -c "print(round($(date +%s.%N)-$sent,1))") s after SIGTERM"
grep -o "stopped by SIGTERM.*" $OUT/stopped.log | tail -1; grep -o "step [0-9]*; saved checkpoint.*" $OUT/stopped.log | tail -1
echo "== resume"; $RUN --output $OUT/stopped > $OUT/resumed.log 2>&1; echo "rc $?"
echo "== killed after task 1, newest checkpoint truncated"
$RUN --output $OUT/damaged > $OUT/damaged.log 2>&1 &
pid=$!
until grep -q "task 2/2" $OUT/damaged.log 2>/dev/null; do sleep 0.2; done
sleep 3; kill -KILL $pid; wait $pid
ck=$(ls -d $OUT/damaged/migu/seed_0/checkpoints/*/ | sort -V | tail -1)
big=$(find $ck -type f -printf "%s %p\n" | sort -n | tail -1 | cut -d' ' -f2)
echo "checkpoints: $(ls $OUT/damaged/migu/seed_0/checkpoints | tr '\n' ' '); truncating $big ($(stat -c %s $big) bytes)"
truncate -s $(( $(stat -c %s $big) / 2 )) $big
$RUN --output $OUT/damaged > $OUT/damaged2.log 2>&1; echo "rc $?"
grep -i "damaged\|resum" $OUT/damaged2.log | head -3
echo "== parameter digests"
for d in whole stopped damaged; do python3 -c "
import json,sys; r=json.load(open('$OUT/$d/results.json')); run=r['runs'][0]
print('$d', run['params_sha256'], run.get('matrix') or run.get('R'))"; done
