#!/bin/bash
# Usage: scripts/test-lanes.sh "STAGE..." "STAGE..."   (make test)
# Runs each list of make targets in order, the two lists side by side: the host's checks and unit tests
# wait mostly on real peers (servers, namespaces, timers), Molecule mostly on its machines, so on two cores
# together they take about as long as the longer alone. Every stage runs even when one before it failed.
# The first list prints as it runs; the second's output is kept and printed whole once the first is done
# (never interleaved). Then a summary by stage; exit 1 if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
make=${MAKE:-make}
work=$(mktemp -d /tmp/amoskys-test-lanes.XXXXXX)
second=
cleanup() {
  [ -n "$second" ] && kill -- "$second" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# lane NAME STAGES: each stage in order; "  stage  verdict  (seconds)" lines into $work/NAME.results.
lane() {
  local name=$1 stage start verdict
  : >"$work/$name.results"
  for stage in $2; do
    start=$(date +%s)
    if "$make" --no-print-directory "$stage"; then verdict=pass; else verdict=FAIL; fi
    printf '  %-13s %s  (%s s)\n' "$stage" "$verdict" $(($(date +%s) - start)) >>"$work/$name.results"
  done
}

started=$(date +%s)
lane second "$2" >"$work/second.log" 2>&1 &
second=$!
lane first "$1"
echo "(waiting for: $2)"
wait "$second"
second=
cat "$work/second.log"
printf '\nmake test, by stage (%s | %s side by side; %s s in all):\n' "$1" "$2" $(($(date +%s) - started))
cat "$work/first.results" "$work/second.results"
! grep -q ' FAIL ' "$work/first.results" "$work/second.results"
