#!/usr/bin/env bash
# Installs every system package Affinity needs to build, test and benchmark on
# Debian 12. Idempotent: re-running it installs nothing new. Needs root (or sudo).
set -euo pipefail

packages=(
  build-essential cmake pkg-config git ca-certificates
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libfaiss-dev libopenblas-dev liblapack-dev
  libcriterion-dev liblmdb-dev libmicrohttpd-dev
  python3-grpcio python3-protobuf python3-numpy
  openssl gnuplot-nox clang-format unzip
  chromium  # the web console test (tests/measure), headless
  nats-server libnats-dev librdkafka-dev
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all ${#packages[@]} packages present"
fi
