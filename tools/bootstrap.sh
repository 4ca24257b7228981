#!/usr/bin/env bash
# Installs every Debian package pipeserve needs to build, test and demo,
# and the npm packages the tests drive (kubernetes-models, openai).
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
  # tools/fuzz.sh: clang with libFuzzer, its sanitizer runtimes, and OpenMP
  # for the CPU kernels (gcc's ASan/UBSan/TSan runtimes come with g++).
  clang-14 libclang-rt-14-dev libfuzzer-14-dev libomp-14-dev
  prometheus               # promtool checks the metrics text in tests
  nlohmann-json3-dev       # JSON: tokenizer vocabularies (server/text)
  libmicrohttpd-dev        # HTTP server (server/transport/http_server)
  curl                     # the demo and the REST tests speak HTTP with it
  libsentencepiece-dev     # SentencePiece tokenizers (server/text)
  python3-sentencepiece    # trains the SentencePiece models the tests check against
  # tools/image.sh: the container image, from a debootstrapped Debian 12 base
  podman runc catatonit debootstrap
  dnsmasq-base             # the DNS server the dns launcher's tests change records of
)

# --- deploy tooling: tools/make_dev_certs.sh and //tests:deploy_test -------
# openssl makes the development certificates; Node.js and npm run the
# Kubernetes schema check and the OpenAI client test (the npm installs are at
# the end of this file).
# Machines that already have npm (e.g. from NodeSource) keep theirs.
PACKAGES+=(openssl)
if ! command -v npm >/dev/null 2>&1; then
  PACKAGES+=(nodejs npm)
fi
# --- end deploy tooling ------------------------------------------------------

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "bootstrap: done" >&2
fi

# --- npm packages the tests drive: kubernetes-models (the Kubernetes API's
# schemas, //tests:deploy_test) and openai (OpenAI's Node client,
# //tests/pytorch:openai_test), at the versions each package-lock.json pins,
# go to ${PIPESERVE_NODE_DIR:-$HOME/.cache/pipeserve-node}/<lockfile hash>/node_modules,
# outside the tree so Bazel never scans it; the tests look there.
# Skipped when that folder is complete; no package's install scripts run.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
node_base="${PIPESERVE_NODE_DIR:-$HOME/.cache/pipeserve-node}"
for node_lock in "$root/tests/k8s_schema/package-lock.json" "$root/tests/openai_client/package-lock.json"; do
  node_dir="$node_base/$(sha256sum "$node_lock" | cut -c1-16)"
  [ -f "$node_dir/.complete" ] && continue
  if ! command -v npm >/dev/null 2>&1; then
    echo "bootstrap: npm not found; install Debian's nodejs and npm packages (apt-get install nodejs npm)" >&2
    exit 1
  fi
  echo "bootstrap: npm ci ($(dirname "$node_lock")) into $node_dir" >&2
  mkdir -p "$node_base"
  node_tmp=$(mktemp -d "$node_base/.install.XXXXXX")
  cp "$node_lock" "$(dirname "$node_lock")/package.json" "$node_tmp/"
  if ! (cd "$node_tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
    rm -rf "$node_tmp"
    echo "bootstrap: npm ci failed (is the npm registry reachable?)" >&2
    exit 1
  fi
  touch "$node_tmp/.complete"
  rm -rf "$node_dir"
  mv -T "$node_tmp" "$node_dir" 2>/dev/null || rm -rf "$node_tmp"  # another bootstrap won
done
# --- end npm packages -------------------------------------------------------
