#!/usr/bin/env bash
# One device-tool call: steps with their own time limits (the call's limit is 600 s), results
# under $OUT/r, packed into $OUT/results.tgz at the end (the tool returns at most 8 files).
# Usage: bash benchmarks/gpu_session.sh "SECONDS COMMAND..." ...   (each step runs with PYTHONPATH=.)
set -u
mkdir -p "$OUT/r"
i=0
for step in "$@"; do
  i=$((i + 1))
  secs=${step%% *}
  cmd=${step#* }
  echo "=== step $i (${secs}s): $cmd"
  start=$(date +%s)
  PYTHONPATH=. timeout "$secs" bash -c "$cmd" > "$OUT/r/step$i.log" 2>&1
  rc=$?
  grep -v "^DEBUG" "$OUT/r/step$i.log" | tail -n 40
  echo "=== step $i rc=$rc in $(( $(date +%s) - start ))s"
done
tar czf "$OUT/results.tgz" -C "$OUT" r
