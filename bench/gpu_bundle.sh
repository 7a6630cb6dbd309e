#!/usr/bin/env bash
# gpu_bundle.sh: builds the GPU suite's binaries HERE (no GPU needed, nvcc is), so that the
# device machine only runs them.
#
#   bash bench/gpu_bundle.sh [BUNDLE_DIR]        (default: build-gpu-bundle/bundle)
#
# Builds, Release with CUDA ON (sm_90 + PTX), in build-gpu-bundle/ (BUILD_DIR overrides): the
# device suites test_gpu_backend, test_gpu_parity and test_als_gpu, test_gpu_host, bench_kernels
# and bench_als (iALS training, GPU vs CPU). Copies them to BUNDLE_DIR/bin and every shared
# library they need that is neither glibc nor the CUDA driver/toolkit (Criterion, gRPC,
# protobuf-c, LMDB, OpenBLAS, libgomp, libmicrohttpd, ...) to
# BUNDLE_DIR/lib; the binaries carry a RUNPATH of $ORIGIN/../lib. cuBLAS and the CUDA runtime
# are NOT copied (libcublasLt alone is over 500 MB, beyond what travels): the device machine's
# CUDA 13 toolkit provides them (gpu_suite.sh adds /usr/local/cuda/lib64 to the search path).
# Writes BUNDLE_DIR/MANIFEST (git commit, binaries, libraries, sizes) and BUNDLE_DIR.tar.xz,
# the folder packed (OpenBLAS alone is 36 MB unpacked; the whole packs to about 12 MB), and
# fails when the packed bundle would not fit the 64 MiB a device call carries.
#
# Then, on the device machine (carry build-gpu-bundle/bundle.tar.xz):
#   bash bench/gpu_suite.sh --quick --bundle build-gpu-bundle/bundle.tar.xz --out "$OUT"
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bundle=${1:-$root/build-gpu-bundle/bundle}
build=${BUILD_DIR:-$root/build-gpu-bundle}
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
limit_mib=${BUNDLE_LIMIT_MIB:-56} # of the 64 MiB a call carries, leave room for the tree

[ -x "$nvcc" ] || { echo "gpu_bundle: no nvcc at $nvcc" >&2; exit 2; }
mkdir -p "$build"
cmake -S "$root" -B "$build" -DAFFINITY_GPU=ON -DAFFINITY_WERROR=OFF -DCMAKE_BUILD_TYPE=Release \
    -DAFFINITY_BENCH=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
    "-DCMAKE_BUILD_RPATH=\$ORIGIN/../lib" >"$build/configure.log" 2>&1 ||
    { tail -n 30 "$build/configure.log" >&2; echo "gpu_bundle: configure failed" >&2; exit 1; }
cmake --build "$build" -j"${JOBS:-2}" --target test_gpu_host test_gpu_backend test_gpu_parity \
    test_als_gpu bench_kernels bench_als

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
bins=("$build/tests/test_gpu_host" "$build/tests/test_gpu_backend" "$build/tests/test_gpu_parity"
    "$build/tests/test_als_gpu" "$build/bench/bench_kernels" "$build/bench/bench_als")
for b in "${bins[@]}"; do
    cp "$b" "$bundle/bin/"
    strip --strip-debug "$bundle/bin/$(basename "$b")" 2>/dev/null || true
done

# Shared libraries to bring: all that ldd resolves, minus glibc and the CUDA driver/toolkit.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libutil|libresolv|libcuda\.so|libnvidia|libcublas|libcublasLt|libcudart)'
for b in "${bins[@]}"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
    if [[ $name =~ $skip ]]; then continue; fi
    cp -L "$path" "$bundle/lib/$name"
done

size_kib=$(du -sk "$bundle" | cut -f1)
tar -cf - -C "$bundle" . | xz -T0 -4 >"$bundle.tar.xz"
packed_kib=$(du -k "$bundle.tar.xz" | cut -f1)
{
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null) ($(git -C "$root" status --porcelain 2>/dev/null | wc -l) changed files)"
    echo "built: $(date -u +%FT%TZ) with $("$nvcc" --version | tail -n 1)"
    echo "size: ${size_kib} KiB, packed ${packed_kib} KiB"
    echo "binaries:"; (cd "$bundle/bin" && ls -l)
    echo "libraries:"; (cd "$bundle/lib" && ls -l)
    echo "from the device machine's CUDA toolkit: libcublas.so.13 libcublasLt.so.13 libcudart.so.13 (+ driver)"
} >"$bundle/MANIFEST"
cp "$bundle/MANIFEST" "$bundle.MANIFEST"
echo "gpu_bundle: $bundle.tar.xz (${packed_kib} KiB packed, ${size_kib} KiB unpacked)"
if [ "$packed_kib" -gt $((limit_mib * 1024)) ]; then
    echo "gpu_bundle: the packed bundle is over ${limit_mib} MiB; it would not travel" >&2
    exit 1
fi
