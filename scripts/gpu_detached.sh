#!/bin/bash
# Training runs that outlive one device call (device tool, session 10). A call carries at most 64 MiB
# (the repo is ~20 MB), so datasets that do not fit one call are carried over several calls, each copied
# out of the working tree (a later call's sync removes carried paths it does not name) into /tmp/data,
# and the runs are started detached (setsid), from a copy of the repo in /tmp/w, so they survive the
# next call; the last call watches them and returns their folders.
#
#   bash scripts/gpu_detached.sh setup              # wheels in .whl → /tmp/site; repo → /tmp/w; .dev/*/ → /tmp/data
#   bash scripts/gpu_detached.sh start NAME ARGS…   # s2amnet train ARGS… --out runs/NAME, detached
#   OUT=… bash scripts/gpu_detached.sh watch SECS   # every 20 s: runs/NAME (no last.pt) → $OUT/NAME.tgz;
#                                                   # returns when no run is left or after SECS
# Carried parts: .dev/<part>/<dataset>/… (merged into /tmp/data/<dataset>) and .dev/<part>/*.tar.xz
# (unpacked into /tmp/data; DeepCrack's label PNGs pack from 31 MB to 0.8 MB). Train arguments may name
# the data as @DATA/<dataset>. KILL (seconds, default 600) bounds each run besides its --time-limit.
# Local dry run: W=/tmp/w-dry D=/tmp/data-dry, --device cpu and --max-train-batches 2.
set -u
W=${W:-/tmp/w}; D=${D:-/tmp/data}; SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
cmd=${1:-}; shift || true
case $cmd in
setup)
  if [ -d .whl ] && ! python3 -c "import pywt, pycocotools" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  fi
  mkdir -p "$W" "$D"
  [ -f "$W/app/cli.py" ] || tar cf - --exclude=./.dev --exclude=./.whl --exclude=./.venv --exclude=./.git \
    --exclude=./runs . | tar xf - -C "$W" || exit 1
  for part in .dev/*/; do
    [ -d "$part" ] || continue
    for f in "$part"*.tar.xz; do [ -e "$f" ] && { tar xJf "$f" -C "$D" || exit 1; }; done
    for sub in "$part"*/; do [ -d "$sub" ] && { cp -r "$sub" "$D/" || exit 1; }; done
  done
  for d in "$D"/*/; do echo "$d: $(find "$d" -type f | wc -l) files"; done
  python3 -c "import torch, pywt, pycocotools; print(torch.__version__, torch.cuda.is_available())"
  ;;
start)
  n=$1; shift
  args=("${@//@DATA/$D}")
  cd "$W" && mkdir -p runs || exit 1
  setsid nohup timeout -s INT "${KILL:-600}" python3 -m app.cli train "${args[@]}" --out "runs/$n" --quiet \
    > "runs/$n.log" 2>&1 < /dev/null &
  echo "started $n (pid $!)"
  ;;
watch)
  end=$(( $(date +%s) + ${1:-540} ))
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  cd "$W" || exit 1
  SMI=none
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > "$OUT/smi.csv" 2>&1 &
    SMI=$!
  fi
  snap() {
    for log in runs/*.log; do
      [ -e "$log" ] || continue
      n=$(basename "$log" .log)
      tar czf "$OUT/.$n.tgz" --exclude=last.pt --exclude='*.tmp' "runs/$n" "$log" 2>/dev/null \
        && mv "$OUT/.$n.tgz" "$OUT/$n.tgz"
    done
  }
  while [ "$(date +%s)" -lt "$end" ] && pgrep -f "app.cli train" > /dev/null; do
    sleep 20; snap
    for log in runs/*.log; do
      echo "$(basename "$log" .log): $(grep -c '^\[' "$log") epochs $(grep '\*best\*' "$log" | tail -n 1 | grep -o 'epoch=[0-9]*\|val_[a-z_]*miou=[0-9.]*\|val_top1=[0-9.]*\|val_macro_recall=[0-9.]*' | tr '\n' ' ')"
    done
  done
  [ "$SMI" = none ] || kill "$SMI"
  snap
  for log in runs/*.log; do echo "== $log"; tail -n 2 "$log" | cut -c1-400; done
  ;;
*)
  echo "usage: $0 setup | start NAME TRAIN-ARGS... | watch SECONDS" >&2; exit 2
  ;;
esac
