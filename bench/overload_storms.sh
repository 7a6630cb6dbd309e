#!/usr/bin/env bash
# overload_storms.sh: RSS of affinityd across repeated overload storms (issue 12, fix 4).
#
#   bench/overload_storms.sh BUILD_DIR OUT_FILE [STORMS] [extra affinityd flags...]
#
# Starts affinityd --demo --queue-limit 64 --backend cpu on a free port, then runs STORMS
# (default 10) open-loop storms of affinity_load (6 s at 12,000 calls/s offered, the default
# mix: far beyond what two cores serve, so most calls are refused with RESOURCE_EXHAUSTED),
# with a 3 s pause after each. Records VmRSS at rest and after each storm, and writes a
# table plus the ratio RSS(after storm N) / RSS(after storm 1) to OUT_FILE.
set -euo pipefail
build="$1"
out="$2"
storms="${3:-10}"
shift 3 || shift $#
work="$(mktemp -d /tmp/affinity-storms-XXXXXX)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
export OMP_WAIT_POLICY=PASSIVE
"$build/src/affinityd" --listen 127.0.0.1:0 --port-file "$work/port" --backend cpu --demo \
    --queue-limit 64 --log-level warn "$@" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ -s "$work/port" ] && break; sleep 0.1; done
port="$(cat "$work/port")"
# SERVING once the demo shop is loaded.
for _ in $(seq 1 600); do
    "$build/src/affinity" --addr "127.0.0.1:$port" info >/dev/null 2>&1 && break
    sleep 0.2
done
sleep 3
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
{
    echo "# affinityd RSS across overload storms"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$(dirname "$0")/.." rev-parse --short HEAD)"
    echo "- machine: nproc=$(nproc), load average before: $(cut -d' ' -f1-3 /proc/loadavg) (shared with other engineers' builds)"
    echo "- server: affinityd --demo --queue-limit 64 --backend cpu $*"
    echo "- storm: affinity_load run --mode open --rate 12000 --max-in-flight 2048 --duration 6 --warmup 0 --collection products"
    echo
    echo "| point | VmRSS MiB | calls sent | OK | RESOURCE_EXHAUSTED |"
    echo "|---|---|---|---|---|"
    echo "| at rest | $(( $(rss) / 1024 )) | | | |"
} >"$out"
first=0
for i in $(seq 1 "$storms"); do
    "$build/bench/affinity_load" run --addr "127.0.0.1:$port" --collection products \
        --mode open --rate 12000 --max-in-flight 2048 --duration 6 --warmup 0 \
        >"$work/storm.txt" 2>&1 || true
    sleep 3
    r="$(rss)"
    [ "$first" = 0 ] && first="$r"
    calls="$(awk '$1 == "calls" {print $2}' "$work/storm.txt")"
    ok="$(awk '$1 == "calls" {gsub(/\(/, "", $3); print $3}' "$work/storm.txt")"
    ex="$(awk '$1 == "error" && $2 == "RESOURCE_EXHAUSTED" {print $4}' "$work/storm.txt")"
    echo "| after storm $i | $(( r / 1024 )) | ${calls:-?} | ${ok:-?} | ${ex:-0} |" >>"$out"
done
last="$(rss)"
awk -v a="$first" -v b="$last" 'BEGIN { printf "\nRSS after the last storm / after the first: %.3f\n", b / a }' >>"$out"
cat "$out"
