#!/usr/bin/env bash
# Builds pipeserve and runs every test, then the same suite again under
# AddressSanitizer + UndefinedBehaviorSanitizer, the concurrency tests under
# ThreadSanitizer, the CUDA configuration, and each fuzz target for
# $PIPESERVE_FUZZ_SECONDS (default 15) seconds, and builds the container
# image and smoke-tests it (tools/image.sh --smoke). Ends with one line
# "N passed, N failed, N skipped": passed and failed count every Bazel test
# target of the normal run and one entry for each of the ASan run, the TSan
# run, the CUDA build, the fuzzing and the image; skipped counts the test cases that
# skipped (GTEST_SKIP, unittest skips: from each target's test.xml or log,
# in every run) and the steps not run here. Each skip is listed by target.
# Exits non-zero on any failure.
#
# Usage: tools/test.sh [extra bazel test flags]
#   PIPESERVE_TEST_QUICK=1 tools/test.sh   # the normal run only
set -uo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh || exit 1

log=$(mktemp)
trap 'rm -f "$log" "$log.skips"' EXIT
start=$(date +%s)
stamp() { echo "[tools/test.sh $(( $(date +%s) - start ))s] $*"; }

stamp "bazel test //..."
bazel test //... "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# Bazel's summary prints one line per test target with its status.
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log")
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|FLAKY|INCOMPLETE|NO STATUS|FAILED TO BUILD)' "$log")
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1  # the build broke before any test could report
  echo "bazel exited with status $status before reporting test results" >&2
fi

# Test cases that skipped in the bazel run logged in $log, whose test logs
# lie where `bazel info [flags] bazel-testlogs` says; each target listed.
skipped=0
count_skips() {
  local dir n
  # With the run's own flags (-c opt moves the logs), or without them if
  # `bazel info` takes none of them.
  dir=$(bazel info "$@" bazel-testlogs 2>/dev/null || bazel info bazel-testlogs 2>/dev/null) || return 0
  n=$(tools/count_skipped.py "$dir" "$log" 2>"$log.skips") || n=0
  skipped=$((skipped + n))
  if [ "$n" -gt 0 ]; then
    echo "skipped test cases:"
    cat "$log.skips"
  fi
}
count_skips "$@"

# One counted entry: runs `cmd...`, prints its output only when it fails.
entry() {
  local name=$1
  shift
  stamp "$name"
  if "$@" > "$log" 2>&1; then
    passed=$((passed + 1))
    grep -E '^//.* (PASSED|FAILED)|^target |_fuzz ' "$log" | sed 's/^/  /'
    echo "$name: PASSED"
  else
    failed=$((failed + 1))
    cat "$log"
    echo "$name: FAILED"
    status=1
  fi
}

if [ "${PIPESERVE_TEST_QUICK:-0}" != 1 ]; then
  # The whole suite again with ASan + UBSan (third_party/sanitizers/README.md).
  # Only what the tests need is rebuilt (benchmarks and tools built above
  # are not built again with the sanitizers). Tests tagged long_running
  # (minutes of load against real processes: tests/reliability_test,
  # netns_test) ran above; their code paths run here in serving_test.
  entry "asan+ubsan (bazel test --config=asan --build_tests_only --test_tag_filters=-long_running //...)" \
    bazel test --config=asan --build_tests_only --test_tag_filters=-long_running //... "$@"
  count_skips --config=asan "$@"

  # The concurrency tests with TSan: the ones whose threads meet through
  # synchronization TSan can see (the list and why is in that README).
  entry "tsan (bazel test --config=tsan //third_party/sanitizers:tsan_tests)" \
    bazel test --config=tsan //third_party/sanitizers:tsan_tests "$@"
  count_skips --config=tsan "$@"

  # The CUDA backend: compiled by nvcc and linked against /usr/local/cuda,
  # and its tests run (the GPU cases skip without a GPU; the no-device
  # errors are checked). Machines without the toolkit skip it.
  cuda_targets=(//runtime:backend_test //runtime:backends_test //runtime/cuda:cuda_backend_test
                //runtime/conformance:conformance_test //bench:cuda_bench //server/stage:stage_server)
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    entry "cuda build (bazel test --config=cuda ${cuda_targets[*]})" \
      bazel test --config=cuda "${cuda_targets[@]}" "$@"
    count_skips --config=cuda "$@"
  else
    echo "cuda build: SKIPPED (no /usr/local/cuda/bin/nvcc on this machine)"
    skipped=$((skipped + 1))
  fi

  # libFuzzer on every input parser, starting from the seed corpora.
  entry "fuzzing (tools/fuzz.sh ${PIPESERVE_FUZZ_SECONDS:-15})" tools/fuzz.sh "${PIPESERVE_FUZZ_SECONDS:-15}"

  # The container image from this run's binaries, and its smoke test
  # (containers in secure mode against PyTorch's answers, clean stops).
  # Skipped, and counted so, where podman cannot run containers (exit 77).
  stamp "image (PIPESERVE_IMAGE_MODE=fastbuild tools/image.sh --smoke)"
  PIPESERVE_IMAGE_MODE=fastbuild tools/image.sh --smoke > "$log" 2>&1
  case $? in
    0) passed=$((passed + 1)); grep -E '^(image|podman|  )' "$log"; echo "image: PASSED" ;;
    77) skipped=$((skipped + 1)); grep SKIPPED "$log" ;;
    *) failed=$((failed + 1)); cat "$log"; echo "image: FAILED"; status=1 ;;
  esac
fi

stamp "done"
echo "(passed and failed count test targets and steps; skipped counts test cases that skipped, listed above, and steps not run)"
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
