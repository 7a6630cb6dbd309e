# syntax=docker/dockerfile:1
#
# affinityd container image, in two stages:
#   build    nvidia/cuda devel image + scripts/install-deps.sh (the package list CI uses),
#            then cmake builds affinityd and the affinity CLI with the CUDA backend.
#   runtime  the matching nvidia/cuda runtime image (CUDA runtime and cuBLAS) plus only the
#            distribution packages that own the shared libraries the binaries load, found
#            with ldd + dpkg -S in the build stage. Runs as the non-root user affinity (10001).
#
#   docker build -t affinityd:0.1.0 .
#   docker run --rm --gpus all -p 50051:50051 -p 9090:9090 affinityd:0.1.0 --demo
#   docker run --rm -p 50051:50051 affinityd:0.1.0 --backend cpu --demo     # no GPU
#
# Build arguments: CUDA_VERSION and UBUNTU pick the nvidia/cuda tags (both stages must
# match); CUDA_ARCHITECTURES the GPU code built (90 = H100/H200 machine code plus PTX that
# newer GPUs JIT-compile); BUILD_JOBS the parallel compile jobs (default: all cores).
ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ARG CUDA_ARCHITECTURES=90
ARG BUILD_JOBS=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# The same script CI runs; copied alone so this layer is cached until the script changes.
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*

COPY . .
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DAFFINITY_GPU=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
        -DAFFINITY_TESTS=OFF -DAFFINITY_BENCH=OFF \
 && cmake --build /build -j"${BUILD_JOBS:-$(nproc)}" --target affinityd affinity \
 && install -D -m 0755 /build/src/affinityd /out/usr/local/bin/affinityd \
 && install -D -m 0755 /build/src/affinity /out/usr/local/bin/affinity \
 && strip --strip-unneeded /out/usr/local/bin/affinityd /out/usr/local/bin/affinity

# Which packages the runtime stage needs: the owners of every shared library the binaries
# load, except the CUDA toolkit's (the runtime base image has them) and the driver's
# libcuda.so.1 (the NVIDIA container toolkit mounts it from the host at run time).
# dpkg may record a library under /lib or /usr/lib (merged /usr): try the path as ldd
# prints it, then its real path, then the other prefix.
RUN libs=$(ldd /out/usr/local/bin/affinityd /out/usr/local/bin/affinity) \
 && if grep 'not found' <<<"$libs" | grep -v 'libcuda\.so'; then \
        echo "unresolved shared libraries" >&2; exit 1; fi \
 && for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$libs" | sort -u); do \
        case "$lib" in /usr/local/cuda*|*/libcuda.so*) continue ;; esac; \
        real=$(readlink -f "$lib"); \
        dpkg -S "$lib" 2>/dev/null || dpkg -S "$real" 2>/dev/null \
            || dpkg -S "${real#/usr}" 2>/dev/null || dpkg -S "/usr$real" 2>/dev/null \
            || { echo "no package owns $lib" >&2; exit 1; }; \
    done | sed 's/: .*//' | tr ', ' '\n\n' | sed '/^$/d' | sort -u >/out/runtime-packages.txt \
 && cat /out/runtime-packages.txt

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -q \
 && xargs -a /tmp/runtime-packages.txt \
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --system --gid 10001 affinity \
 && useradd --system --uid 10001 --gid affinity --home-dir /var/lib/affinity \
        --no-create-home --shell /usr/sbin/nologin affinity \
 && install -d -o affinity -g affinity -m 0750 /var/lib/affinity

COPY --from=build /out/usr/local/bin/ /usr/local/bin/

# Metrics on by default in the image (a flag or AFFINITY_METRICS_LISTEN="" overrides it);
# the CUDA JIT cache goes to /tmp so the root filesystem can be read-only.
ENV AFFINITY_METRICS_LISTEN=0.0.0.0:9090 \
    CUDA_CACHE_PATH=/tmp/cuda-cache

USER 10001:10001
WORKDIR /var/lib/affinity
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/affinityd"]
CMD []
