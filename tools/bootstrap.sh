#!/usr/bin/env bash
# Installs every Debian package pipeserve needs to build, test and demo.
# Idempotent: when all are present it only checks (well under a second);
# otherwise it runs `apt-get update` once and installs what is missing.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap          # Bazel 4.2.3 (offline: see third_party/README.md)
  g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev
  libgtest-dev libgmock-dev
  libdnnl-dev              # oneDNN sgemm: the CPU GEMM (runtime/README.md)
  zlib1g-dev               # CRC-32 of model weights
  python3-torch python3-numpy python3-protobuf python3-grpcio python3-yaml
  libopenblas0-pthread     # PyTorch's BLAS, for the reference and baselines
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "bootstrap: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "bootstrap: done" >&2
