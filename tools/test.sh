#!/usr/bin/env bash
# Builds pipeserve and runs every test: `bazel test //...`, then one line
# "N passed, N failed" counting every Bazel test target. Exits non-zero on
# any failure. Usage: tools/test.sh [extra bazel test flags]
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
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
