#!/usr/bin/env bash
# widgets.sh: server CPU per event of PutEvents with the widget statistics kept
# (--widgets=true, the default) and without (--widgets=false), through gRPC on a real affinityd
# with a --data-dir, in alternating runs of the same load. Server CPU is the process's user +
# system time from /proc/PID/stat over the measured seconds; events come from affinity_load's
# JSON report. Prints one line per run and the ratio; bench/bench_widgets measures the events
# path in-process, the serving cost and the memory.
#
#   bench/widgets.sh [build-dir] [seconds per run (default 10)] [events per call (default 1)]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
dur="${2:-10}"
per_call="${3:-1}"
. "$root/bench/lib.sh"
bench_init widgets
"$load" gen --out "$work/data" --rows 20000 --dim 64 --queries 100 --clusters 50 >/dev/null
tck=$(getconf CLK_TCK)

# One run: start a server with the widget flag, fill every user's window, measure.
run() {
  local widgets="$1" label="$2"
  rm -rf "$work/store"
  bench_start_server --widgets="$widgets"
  "$cli" --addr "$addr" collections create shop --dim 64 >/dev/null
  "$cli" --addr "$addr" load shop --vectors "$work/data/catalog.npy" \
    --attrs "$work/data/catalog.csv" --no-progress >/dev/null
  local flags=(--addr "$addr" --collection shop --users 2000 --mix events=1
               --events-per-call "$per_call" --concurrency 16)
  "$load" run "${flags[@]}" --duration "$dur" --warmup 1 >/dev/null 2>&1 # fill the windows
  local c0 c1
  c0=$(cpu_ticks "$pid")
  "$load" run "${flags[@]}" --duration "$dur" --warmup 0 --json "$work/run.json" >/dev/null 2>&1
  c1=$(cpu_ticks "$pid")
  local calls
  calls=$(python3 -c "import json; print(json.load(open('$work/run.json'))['ok'])")
  local events=$((calls * per_call))
  python3 -c "print('%-8s widgets=%-5s %8d events  %6.2f s server CPU  %7.2f us per event' % ('$label', '$widgets', $events, ($c1 - $c0) / $tck, ($c1 - $c0) / $tck / $events * 1e6))"
  echo "$widgets $events $((c1 - c0))" >>"$work/sums"
  bench_stop_server
}

echo "# PutEvents ($per_call event(s) per call, 16 in flight, 2000 users, 20000 items), $dur s per run"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2 3; do
  run true "round$round"
  run false "round$round"
done
python3 - "$work/sums" "$tck" <<'EOF'
import sys
tck = float(sys.argv[2])
tot = {"true": [0, 0], "false": [0, 0]}
for line in open(sys.argv[1]):
    w, ev, ticks = line.split()
    tot[w][0] += int(ev)
    tot[w][1] += int(ticks)
on = tot["true"][1] / tck / tot["true"][0] * 1e6
off = tot["false"][1] / tck / tot["false"][0] * 1e6
print("with widgets %.2f us, without %.2f us server CPU per event: ratio %.3f (target <= 1.20)"
      % (on, off, on / off))
EOF
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
