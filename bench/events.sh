#!/usr/bin/env bash
# events.sh: behaviour events ingested per second through gRPC (PutEvents with 1 and with 100
# events per call, durable LMDB commits with fsync on a --data-dir) and the latency they add
# to a concurrent Recommend-by-user load. Uses bench/affinity_load against a real affinityd
# and writes bench/results/<date>-cpu-<nproc>core/events.md.
#
#   bench/events.sh [build-dir] [seconds per run (default 10)] [extra affinityd flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
dur="${2:-10}"
shift 2 || shift $# || true
server_flags=("$@")
cmake -S "$root" -B "$build" -DAFFINITY_GPU=OFF >/dev/null
out_dir="$root/bench/results/$(date -u +%Y-%m-%d)-cpu-$(nproc)core"
mkdir -p "$out_dir"
out="$out_dir/events.md"
. "$root/bench/lib.sh"
bench_init events
mkdir -p "$work/data"
"$load" gen --out "$work/data" --rows 20000 --dim 64 --queries 1000 --clusters 50 >/dev/null
bench_start_server "${server_flags[@]}"
"$cli" --addr "$addr" collections create shop --dim 64 >/dev/null
"$cli" --addr "$addr" load shop --vectors "$work/data/catalog.npy" --attrs "$work/data/catalog.csv" \
  --no-progress >/dev/null

# One run: label, then affinity_load flags. Prints affinity_load's report.
run() {
  local label="$1"
  shift
  echo "### $label"
  echo
  echo '```'
  echo "affinity_load run --addr \$ADDR --collection shop --users 10000 --duration $dur --warmup 2 $*"
  "$load" run --addr "$addr" --collection shop --users 10000 --duration "$dur" --warmup 2 \
    --label "$label" "$@" 2>&1
  echo '```'
  echo
}

{
  echo "# Behaviour events through gRPC: ingest rate and effect on Recommend"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD)"
  echo "- machine: nproc=$(nproc), $(lscpu | grep 'Model name' | sed 's/  */ /g')"
  echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- command: bench/events.sh ${build#$root/} $dur ${server_flags[*]}"
  echo "- server: affinityd --data-dir (LMDB, fsync on every commit; concurrent PutEvents calls"
  echo "  share commits), --backend cpu ${server_flags[*]}, defaults otherwise;"
  echo "  catalog: 20,000 items, d = 64, cosine (affinity_load gen); users user-0..user-9999;"
  echo "  events: 70% view, 20% click, 7% add_to_cart, 3% purchase on Zipf-drawn items."
  echo "- note: the machine is shared with other engineers' builds and tests (noisy), and the"
  echo "  load generator runs on the same 2 cores as the server and takes CPU from it."
  echo "  events/s = calls/s x events per call (every event is applied: all ids exist)."
  echo
  echo "## Events alone"
  echo
  run "events, 1 per call, 16 in flight" --mix events=1 --events-per-call 1 --concurrency 16
  run "events, 100 per call, 8 in flight" --mix events=1 --events-per-call 100 --concurrency 8
  echo "## Recommend by user alone (profiles from the runs above)"
  echo
  run "recommend, 8 in flight" --mix recommend=1 --concurrency 8
  echo "## Recommend with events at the same time (two load generators)"
  echo
  ev_log="$work/events_concurrent.txt"
  "$load" run --addr "$addr" --collection shop --users 10000 --duration "$((dur + 2))" \
    --warmup 1 --mix events=1 --events-per-call 100 --concurrency 4 \
    --label "events beside recommend" >"$ev_log" 2>&1 &
  ev_pid=$!
  run "recommend, 8 in flight, beside 4 PutEvents(100) calls in flight" --mix recommend=1 \
    --concurrency 8
  wait "$ev_pid" || true
  echo "### the concurrent events run"
  echo
  echo '```'
  echo "affinity_load run --addr \$ADDR --collection shop --users 10000 --duration $((dur + 2)) --warmup 1 --mix events=1 --events-per-call 100 --concurrency 4"
  cat "$ev_log"
  echo '```'
} | tee "$out"
echo "wrote $out" >&2
