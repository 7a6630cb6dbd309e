#!/usr/bin/env bash
# Installs dependencies, builds affinityd and the affinity CLI, and starts the server on the
# built-in demo shop (100,000 products, categories, banners, offers) at 127.0.0.1:50051.
#
#   scripts/demo.sh [extra affinityd flags...]      e.g. scripts/demo.sh --listen 0.0.0.0:50051
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAFFINITY_GPU=AUTO >/dev/null
cmake --build build -j"$(nproc)" --target affinityd affinity
export OMP_WAIT_POLICY=PASSIVE
exec build/src/affinityd --demo --listen 127.0.0.1:50051 "$@"
