#!/usr/bin/env bash
# pipeline_server.sh: server CPU per call of the ranking pipeline through gRPC, on a real
# affinityd: Search by vector (the bare engine call a client can make), Recommend by stored
# profile without rules, Recommend with the serving-config preset "all" (the rules of
# bench_pipeline: a boost, a bury, a pin, a promotion of one category in 50 with share 0.2,
# max 3 per category, diversity 0.3, exploration 0.1) by stored profile and, with and without
# it, by the Search phase's query vectors (`--recommend-by vector`: the same vectors as the bare call, so the
# issue's ratio compares like with like; a stored profile, the mean of 20 random items, scans
# differently from a query near one cluster), and RecommendPage of the layout "home"
# (bench_pipeline's page: hero banner 1, category row 6, "for you" 12 products, offers 2; the
# banners, categories and offers collections ranked by the shopper's products profile).
# N = 100k, d = 128, k = 10, 64 calls in flight (batched). Server CPU is the process's user +
# system time from /proc/PID/stat over the measured seconds; calls come from affinity_load's
# JSON report. The kinds run in turn, --rounds times, on one server; the ratios use each
# kind's median. bench_pipeline measures the same rules in-process (no transport).
#
#   bench/pipeline_server.sh [build-dir] [seconds per run (default 8)] [rounds (default 3)]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
dur="${2:-8}"
rounds="${3:-3}"
. "$root/bench/lib.sh"
bench_init pipeline-server
"$load" gen --out "$work/data" --rows 100000 --dim 128 --queries 4096 --clusters 50 >/dev/null
small=(banners:200 categories:50 offers:100)
for cn in "${small[@]}"; do
  "$load" gen --out "$work/${cn%%:*}" --rows "${cn##*:}" --dim 128 --queries 1 >/dev/null
done
cat >"$work/serving.json" <<'EOF'
{"presets": {"all": {
  "boosts": [{"filter": {"tags": ["tag-1"]}, "weight": 0.05},
             {"filter": {"tags": ["tag-2"]}, "weight": -0.05}],
  "pins": [{"item_id": "item-7", "position": 3}],
  "promotions": [{"name": "gifts", "filter": {"categories": ["cat-7"]}, "share": 0.2}],
  "max_per_category": 3,
  "diversity": 0.3,
  "exploration": {"share": 0.1, "seed": 7}}},
 "layouts": {"home": [{"name": "hero", "collection": "banners", "k": 1},
                      {"name": "categories", "collection": "categories", "k": 6},
                      {"name": "for-you", "collection": "shop", "k": 12},
                      {"name": "offers", "collection": "offers", "k": 2}]},
 "collections": {"banners": {"ranked_by": "shop"}, "categories": {"ranked_by": "shop"},
                 "offers": {"ranked_by": "shop"}}}
EOF
tck=$(getconf CLK_TCK)
bench_start_server --serving-config "$work/serving.json"
"$cli" --addr "$addr" collections create shop --dim 128 >/dev/null
"$cli" --addr "$addr" load shop --vectors "$work/data/catalog.npy" \
  --attrs "$work/data/catalog.csv" --no-progress >/dev/null
for cn in "${small[@]}"; do
  "$cli" --addr "$addr" collections create "${cn%%:*}" --dim 128 >/dev/null
  "$cli" --addr "$addr" load "${cn%%:*}" --vectors "$work/${cn%%:*}/catalog.npy" \
    --attrs "$work/${cn%%:*}/catalog.csv" --no-progress >/dev/null
done
common=(--addr "$addr" --collection shop --users 2000 --k 10 --concurrency 64)
# every shopper gets a profile and a history (reasons read it)
"$load" run "${common[@]}" --mix events=1 --events-per-call 20 --duration 6 --warmup 0 >/dev/null 2>&1

echo "# bench/pipeline_server.sh: server CPU per call through gRPC"
echo "- date $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD), nproc $(nproc)"
echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
one() { # label, affinity_load flags...
  local label="$1"
  shift
  local c0 c1
  c0=$(cpu_ticks "$pid")
  "$load" run "${common[@]}" "$@" --duration "$dur" --warmup 0 --json "$work/run.json" >/dev/null 2>&1
  c1=$(cpu_ticks "$pid")
  local calls
  calls=$(python3 -c "import json; print(json.load(open('$work/run.json'))['ok'])")
  python3 -c "print('%-14s %7d calls  %6.2f s server CPU  %8.1f us per call' % ('$label', $calls, ($c1 - $c0) / $tck, ($c1 - $c0) / $tck / max($calls, 1) * 1e6))"
  echo "$label $calls $((c1 - c0))" >>"$work/sums"
}
# warm-up of each kind, not counted
for mix in search recommend page; do
  "$load" run "${common[@]}" --queries "$work/data/queries.npy" --mix "$mix=1" --layout home \
    --duration 2 --warmup 0 >/dev/null 2>&1
done
for r in $(seq 1 "$rounds"); do
  one search --queries "$work/data/queries.npy" --mix search=1
  one recommend --mix recommend=1
  one recommend+all --mix recommend=1 --preset all
  one vector --queries "$work/data/queries.npy" --recommend-by vector --mix recommend=1
  one vector+all --queries "$work/data/queries.npy" --recommend-by vector --mix recommend=1 \
    --preset all
  one page --mix page=1 --layout home
done
python3 - "$work/sums" "$tck" <<'EOF'
import statistics, sys
per = {}
tck = float(sys.argv[2])
for line in open(sys.argv[1]):
    label, calls, ticks = line.split()
    per.setdefault(label, []).append(int(ticks) / tck / max(int(calls), 1) * 1e6)
med = {k: statistics.median(v) for k, v in per.items()}
print("medians (us server CPU per call): " + ", ".join("%s %.1f" % kv for kv in med.items()))
print("recommend (no rules) / search = %.3f" % (med["recommend"] / med["search"]))
print("recommend by vector (no rules) / search = %.3f   (the same query vectors)" % (med["vector"] / med["search"]))
print("recommend by vector + all rules / search = %.3f   (issue 11 target <= 1.10; the same query vectors)" % (med["vector+all"] / med["search"]))
print("recommend + all rules / search = %.3f   (stored profiles against the query vectors)" % (med["recommend+all"] / med["search"]))
print("recommend + all rules / recommend (no rules) = %.3f" % (med["recommend+all"] / med["recommend"]))
print("page (4 slots) / recommend (no rules) = %.3f   (issue 11 target <= 2)" % (med["page"] / med["recommend"]))
EOF
if grep -q '"level":"error"' "$work/affinityd.log"; then
  echo "server errors:" >&2
  grep '"level":"error"' "$work/affinityd.log" | head -5 >&2
fi
