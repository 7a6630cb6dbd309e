#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs every dependency, builds
# everything with warnings as errors (CUDA kernels included whenever nvcc is present, so a
# machine without a GPU still compiles them), runs every ctest suite, then rebuilds the CPU
# path under AddressSanitizer + UndefinedBehaviorSanitizer and runs the suites again.
#
#   scripts/test.sh                 everything (what CI runs)
#   AFFINITY_SKIP_SANITIZE=1 ...    skip the sanitizer pass
#   AFFINITY_BUILD_DIR=dir ...      build directory (default: build)
#
# GPU suites (ctest label "gpu") skip with a reason when no CUDA device is present;
# bench/gpu_suite.sh runs them on a GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/install-helm.sh
export PATH="$PWD/.tools/bin:$PATH"

# OpenMP reads this once at process start; without it FAISS and OpenBLAS threads spin
# against each other (4-25x slower). Every test process inherits it.
export OMP_WAIT_POLICY=PASSIVE

jobs=$(nproc)
build=${AFFINITY_BUILD_DIR:-build}

echo "== build ($build): warnings as errors, AFFINITY_GPU=AUTO"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAFFINITY_WERROR=ON -DAFFINITY_GPU=AUTO
cmake --build "$build" -j"$jobs"

echo "== tests ($build)"
ctest --test-dir "$build" --output-on-failure --timeout 900 -j"$jobs"

if [ "${AFFINITY_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== sanitizer build (build-asan): ASan + UBSan, CPU path"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DAFFINITY_SANITIZE=ON -DAFFINITY_WERROR=ON \
        -DAFFINITY_GPU=OFF -DAFFINITY_BENCH=OFF
  cmake --build build-asan -j"$jobs"
  echo "== tests (build-asan)"
  # The emulated GPU backend suite runs in the -Werror build above only (label emul-slow).
  ctest --test-dir build-asan --output-on-failure --timeout 1800 -j"$jobs" -LE 'helm|emul-slow'
fi
