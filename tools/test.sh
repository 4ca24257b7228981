#!/usr/bin/env bash
# Builds pipeserve and runs every test: `bazel test //...`, then the CUDA
# configuration (`bazel test --config=cuda` of the CUDA targets, one entry),
# then one line "N passed, N failed" counting every Bazel test target and
# that entry. Exits non-zero on any failure.
# Usage: tools/test.sh [extra bazel test flags]
set -uo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh || exit 1

log=$(mktemp)
trap 'rm -f "$log"' EXIT
bazel test //... "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# Bazel's summary prints one line per test target with its status.
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log")
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|FLAKY|INCOMPLETE|NO STATUS|FAILED TO BUILD)' "$log")
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1  # the build broke before any test could report
  echo "bazel exited with status $status before reporting test results" >&2
fi

# The CUDA backend: compiled by nvcc and linked against /usr/local/cuda, and
# its tests run (the GPU cases skip without a GPU; the no-device errors are
# checked). One entry in the count. Machines without the toolkit skip it.
cuda_targets=(//runtime:backend_test //runtime:backends_test //runtime/cuda:cuda_backend_test
              //bench:cuda_bench //server/stage:stage_server)
if [ -x /usr/local/cuda/bin/nvcc ]; then
  if bazel test --config=cuda "${cuda_targets[@]}" "$@" > "$log" 2>&1; then
    passed=$((passed + 1))
    echo "cuda build (bazel test --config=cuda ${cuda_targets[*]}): PASSED"
  else
    failed=$((failed + 1))
    cat "$log"
    echo "cuda build (bazel test --config=cuda ${cuda_targets[*]}): FAILED"
    status=1
  fi
else
  echo "cuda build: skipped (no /usr/local/cuda/bin/nvcc on this machine)"
fi
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
