#!/usr/bin/env bash
# Builds the pipeserve container image with podman, no registry needed:
#   1. a base of Debian 12 (minbase) with the runtime libraries only, made
#      by debootstrap from Debian's archive; cached as a tarball in
#      ${PIPESERVE_IMAGE_CACHE:-$HOME/.cache/pipeserve-image} (its name is
#      the hash of the package list) and imported as localhost/pipeserve-base;
#   2. the image, localhost/pipeserve:0.1, from deploy/Dockerfile over the
#      binaries built here (Bazel, -c opt; PIPESERVE_IMAGE_MODE=fastbuild
#      reuses a test run's build), saved as out/image/pipeserve-oci.tar.
# Prints the image's size and the build's time. With --smoke, then runs
# tests/image_smoke_test.py against it (containers of the image in secure
# mode; see there).
#
#   tools/image.sh [--smoke]
#
# Exits 77 (and says why) where podman cannot run containers here.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh

smoke=0
[ "${1:-}" = --smoke ] && smoke=1
mode=${PIPESERVE_IMAGE_MODE:-opt}
out=out/image
mkdir -p "$out"
start=$(date +%s.%N)

# podman's configuration, with this host's hard limits on open files and
# processes.
nproc=$(ulimit -Hu)
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
sed "s/@NOFILE@/$(ulimit -Hn)/g; s/@NPROC@/$nproc/g" deploy/containers.conf.in > "$out/containers.conf"
export CONTAINERS_CONF="$PWD/$out/containers.conf"
if [ "$(id -u)" != 0 ]; then
  echo "image: SKIPPED: podman and debootstrap need root here (rootless podman needs subuid ranges)" >&2
  exit 77
fi
if ! podman info > "$out/podman.log" 2>&1; then
  cat "$out/podman.log" >&2
  echo "image: SKIPPED: podman does not run here (above)" >&2
  exit 77
fi

# --- 1. the base -------------------------------------------------------------
packages=libgrpc++1.51,libprotobuf32,libabsl20220623,libdnnl2,libgomp1,zlib1g,libmicrohttpd12,libsentencepiece0
suite=bookworm
mirror=${PIPESERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
hash=$(echo "$suite $packages" | sha256sum | cut -c1-12)
cache=${PIPESERVE_IMAGE_CACHE:-$HOME/.cache/pipeserve-image}
base_tar="$cache/base-$hash.tar"
if [ ! -f "$base_tar" ]; then
  echo "image: debootstrap $suite (minbase + $packages)" >&2
  mkdir -p "$cache"
  root=$(mktemp -d "$cache/.root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
      > "$cache/debootstrap.log" 2>&1; then
    tail -20 "$cache/debootstrap.log" >&2
    echo "image: SKIPPED: debootstrap cannot build the base here (above; is $mirror reachable?)" >&2
    exit 77
  fi
  # Runtime only: no package lists, caches, documentation or locales.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  tar -C "$root" -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  rm -rf "$root"
  trap - EXIT
fi
base=localhost/pipeserve-base:$hash
if ! podman image exists "$base"; then
  if ! podman import --quiet "$base_tar" "$base" > /dev/null 2> "$out/podman.log"; then
    cat "$out/podman.log" >&2
    echo "image: SKIPPED: podman cannot import an image here (above)" >&2
    exit 77
  fi
fi
if ! podman run --rm --network none "$base" true > /dev/null 2> "$out/podman.log"; then
  cat "$out/podman.log" >&2
  echo "image: SKIPPED: podman cannot run a container here (above)" >&2
  exit 77
fi

# --- 2. the image --------------------------------------------------------------
targets=(//server/coordinator:coordinator //server/stage:stage_server //client:pipeserve
         //server/text:libpipeserve_sentencepiece.so)
if ! bazel build -c "$mode" "${targets[@]}" > "$out/bazel.log" 2>&1; then
  grep -E '^(ERROR|FAILED)|error:' "$out/bazel.log" | head -20 >&2
  echo "image: the build failed (above; $out/bazel.log)" >&2
  exit 1
fi
bin=$(bazel info -c "$mode" bazel-bin 2>/dev/null)
ctx="$out/context"
rm -rf "$ctx"
mkdir -p "$ctx/bin"
install -m 755 "$bin/server/coordinator/coordinator" "$bin/server/stage/stage_server" \
  "$bin/client/pipeserve" "$ctx/bin/"
install -m 644 "$bin/server/text/libpipeserve_sentencepiece.so" "$ctx/bin/"
install -m 755 deploy/entrypoint.sh "$ctx/entrypoint.sh"
previous=$(podman image inspect --format '{{.Id}}' localhost/pipeserve:0.1 2>/dev/null || true)
if ! podman build --quiet --build-arg "BASE=$base" -f deploy/Dockerfile -t localhost/pipeserve:0.1 \
    "$ctx" > /dev/null 2> "$out/podman.log"; then
  cat "$out/podman.log" >&2
  echo "image: podman build failed" >&2
  exit 1
fi
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' localhost/pipeserve:0.1)" ]; then
  podman rmi "$previous" > /dev/null 2>&1 || true  # the build this one replaced
fi
rm -f "$out/pipeserve-oci.tar"
podman save --quiet --format oci-archive -o "$out/pipeserve-oci.tar" localhost/pipeserve:0.1
awk -v start="$start" -v now="$(date +%s.%N)" -v mode="$mode" -v out="$out/pipeserve-oci.tar" \
    -v size="$(podman image inspect --format '{{.Size}}' localhost/pipeserve:0.1)" \
    -v base="$(podman image inspect --format '{{.Size}}' "$base")" \
    -v archive="$(stat -c %s "$out/pipeserve-oci.tar")" 'BEGIN {
  m = 1048576
  printf "image: localhost/pipeserve:0.1 (-c %s) %.0f MiB (base %.0f MiB, pipeserve %.0f MiB); " \
         "%s %.0f MiB; built in %.1f s\n", mode, size / m, base / m, (size - base) / m, out,
         archive / m, now - start
}'

# The image's runtime libraries are the host's (both Debian 12): a binary
# that needs one the base lacks fails here, not in a cluster.
if ! podman run --rm --entrypoint sh localhost/pipeserve:0.1 -c \
    'ldd /usr/local/bin/coordinator /usr/local/bin/stage_server /usr/local/bin/pipeserve /usr/local/bin/libpipeserve_sentencepiece.so | grep "not found"; test $? = 1' \
    > "$out/podman.log" 2>&1; then
  cat "$out/podman.log" >&2
  echo "image: a binary needs a library the base lacks (above): add its package to \$packages" >&2
  exit 1
fi

if [ "$smoke" = 1 ]; then
  /usr/bin/python3 tests/image_smoke_test.py
fi
