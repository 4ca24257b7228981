#!/usr/bin/env bash
# Runs a fuzz target over its corpus folder (see fuzz.bzl).
set -euo pipefail
target=$1
corpus=$2
[ -d "$corpus" ] || { echo "no corpus at $corpus" >&2; exit 1; }
exec "$target" "$corpus"
