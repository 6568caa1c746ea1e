#!/bin/sh
# Fuzz every reader in rounds of time-boxed chunks (nice 19, one worker, --resume) until each has
# TARGET executions, the file fuzz/STOP exists or the deadline passes. Each chunk runs for
# CHUNK_SECONDS of wall time (default 300), never past the deadline, so readers advance evenly.
# Usage: sh fuzz/run_chunks.sh [TARGET] [DEADLINE_EPOCH] [READERS...]
cd "$(dirname "$0")/.." || exit 1
TARGET=${1:-100000}
DEADLINE=${2:-0}
shift 2 2>/dev/null
READERS=${*:-dicom nifti wfdb photo slide}
OUT=benchmarks/results
mkdir -p "$OUT"
while :; do
  all_done=1
  for r in $READERS; do
    [ -f fuzz/STOP ] && exit 0
    secs=${CHUNK_SECONDS:-300}
    if [ "$DEADLINE" -gt 0 ]; then
      left=$((DEADLINE - $(date +%s)))
      [ "$left" -le 20 ] && exit 0
      [ "$left" -lt "$secs" ] && secs=$left
    fi
    n=$(.venv/bin/python -c "import json;print(json.load(open('$OUT/fuzz_$r.json'))['execs'])" 2>/dev/null || echo 0)
    [ "$n" -ge "$TARGET" ] && continue
    all_done=0
    nice -n 19 .venv/bin/python -m fuzz.fuzz_readers --reader "$r" --execs $((TARGET - n)) --seconds "$secs" \
      --workers 1 --out "$OUT/fuzz_$r.json" --resume >> "${FUZZ_LOG:-/tmp/m3bind_fuzz_log.txt}" 2>&1
  done
  [ $all_done = 1 ] && exit 0
done
