#!/bin/sh
# Fuzz every reader in rounds of chunks (nice 19, one worker) until each has TARGET executions
# or the file STOP exists / the deadline passes. Usage: sh fuzz/run_chunks.sh [TARGET] [DEADLINE_EPOCH]
cd "$(dirname "$0")/.." || exit 1
TARGET=${1:-100000}
DEADLINE=${2:-0}
OUT=benchmarks/results
mkdir -p "$OUT"
while :; do
  all_done=1
  for r in dicom nifti wfdb photo slide; do
    [ -f fuzz/STOP ] && exit 0
    [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -ge "$DEADLINE" ] && exit 0
    n=$(.venv/bin/python -c "import json,sys;print(json.load(open('$OUT/fuzz_$r.json'))['execs'])" 2>/dev/null || echo 0)
    [ "$n" -ge "$TARGET" ] && continue
    all_done=0
    chunk=${CHUNK:-2000}; [ "$r" = slide ] && chunk=${SLIDE_CHUNK:-300}
    nice -n 19 .venv/bin/python -m fuzz.fuzz_readers --reader "$r" --execs $chunk --workers 1 \
      --out "$OUT/fuzz_$r.json" --resume >> "${FUZZ_LOG:-/tmp/m3bind_fuzz_log.txt}" 2>&1
  done
  [ $all_done = 1 ] && exit 0
done
