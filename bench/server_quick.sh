#!/usr/bin/env bash
# server_quick.sh: builds affinityd and bench_server_quick, runs the quick server benchmark
# (Search calls/s and p50/p99 at 1, 16, 64 and 256 calls in flight, batched and max_batch=1,
# against raw FAISS measured in the same run) and writes
# bench/results/<date>-cpu-<nproc>core/server_quick.md.
#
#   bench/server_quick.sh [build-dir] [extra bench_server_quick flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
shift || true
cmake -S "$root" -B "$build" -DAFFINITY_GPU=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target affinityd bench_server_quick >/dev/null
out_dir="$root/bench/results/$(date -u +%Y-%m-%d)-cpu-$(nproc)core"
mkdir -p "$out_dir"
out="$out_dir/server_quick.md"
export OMP_WAIT_POLICY=PASSIVE
{
  echo "# affinityd quick server benchmark"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD)"
  echo "- machine: nproc=$(nproc), $(lscpu | grep 'Model name' | sed 's/  */ /g')"
  echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg); CPU idle in the second before: $(vmstat 1 2 | tail -1 | awk '{print $15}')%"
  echo "- command: bench/server_quick.sh $* (bench_server_quick $*)"
  echo "- note: the machine is shared with other engineers' builds and tests (noisy); the"
  echo "  client runs on the same 2 cores as the server and takes CPU from it."
  echo
  "$build/bench/bench_server_quick" "$@"
} | tee "$out"
echo "wrote $out" >&2
