#!/bin/bash
# A prepared GPU call (device tool, session 6): four magnetic-tile classify (+ aux mask head) runs side by
# side on one GPU, each continuing from the shipped pair, with the best folders and logs snapshot into
# $OUT every 30 s so that a call cut off at its limit still returns the best weights.
# Carry .whl (PyWavelets + pycocotools wheels for the machine's Python) and .dev/gpu (this script's data:
# `cp -r ../shared/data/magnetic-tile .dev/gpu/`), then: `OUT=$OUT TL=7.5 KILL=540 bash scripts/gpu_parallel_runs.sh`.
# Local dry run: `DEV=cpu TL=0.5 SMOKE="--max-train-batches 2 --max-val-images 8" bash scripts/gpu_parallel_runs.sh`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TL=${TL:-7.5}; KILL=${KILL:-540}; DEV=${DEV:-cuda}; SMOKE=${SMOKE:-}
if [ -d .whl ] && ! python3 -c "import pywt, pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
D=../shared/data; mkdir -p $D 2>/dev/null || D=/tmp/data
[ -d $D/magnetic-tile ] || { mkdir -p $D && cp -r .dev/gpu/magnetic-tile $D/; }
(nvidia-smi; python3 -c "import torch,pywt;print(torch.__version__, torch.cuda.is_available())") > "$OUT/env.txt" 2>&1
export PYTHONUNBUFFERED=1
common="--task classify --data $D/magnetic-tile --name mt-classify --batch 16 --warmup-epochs 1 --epochs 80
 --val-every 2 --init-backbone weights/mt-segment --init-weights weights/mt-classify --workers 3 --threads 2
 --device $DEV --quiet --time-limit $TL $SMOKE"
run() {  # name, extra args
  local n=$1; shift
  timeout -s INT $KILL python3 -m app.cli train $common "$@" --out runs/g$n \
    --export runs/g$n-export/mt-classify --export-mask runs/g$n-export/mt-segment > runs/g$n.log 2>&1
  echo "job $n rc=$?" >> runs/g$n.log
}
snap() {
  for n in A B C D; do
    [ -d runs/g$n ] || continue
    tar czf "$OUT/.g$n.tgz" --exclude='last.pt' --exclude='*.tmp' runs/g$n runs/g$n.log $(ls -d runs/g$n-export 2>/dev/null) 2>/dev/null \
      && mv "$OUT/.g$n.tgz" "$OUT/g$n.tgz"
  done
}
mkdir -p runs
run A --imgsz 320 --lr 5e-4 --seed 42 &
run B --imgsz 320 --lr 1e-3 --seed 1 &
run C --imgsz 384 --lr 5e-4 --seed 2 &
run D --imgsz 320 --lr 2e-4 --seed 3 &
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 20 > "$OUT/smi.csv" 2>&1) &
SMI=$!
while [ -n "$(jobs -r -p | grep -v "^$SMI$")" ]; do sleep 30; snap; grep -h "best\|epochs" runs/g?.log | tail -n 4; done
wait %1 %2 %3 %4
kill $SMI 2>/dev/null
snap
tail -n 3 runs/g?.log
