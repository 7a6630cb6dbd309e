#!/usr/bin/env bash
# Installs dependencies, builds affinityd and the affinity CLI, and starts the server on the
# built-in demo shop (100,000 products, categories, banners, offers) at 127.0.0.1:50051.
#
#   scripts/demo.sh [extra affinityd flags...]      e.g. scripts/demo.sh --listen 0.0.0.0:50051
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "demo: checking dependencies (scripts/install-deps.sh)..." >&2
scripts/install-deps.sh
echo "demo: configuring the build (cmake, ~10 s the first time)..." >&2
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAFFINITY_GPU=AUTO >/dev/null
echo "demo: building affinityd and affinity..." >&2
cmake --build build -j"$(nproc)" --target affinityd affinity
export OMP_WAIT_POLICY=PASSIVE
echo "demo: starting affinityd on 127.0.0.1:50051 with the demo shop; try build/src/affinity health" >&2
echo "demo: metrics and the web console on http://127.0.0.1:9090/console" >&2
exec build/src/affinityd --demo --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9090 "$@"
