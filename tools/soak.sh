#!/usr/bin/env bash
# Soak test (not in CI; CI runs the 60 s version in tools/test.sh): 64
# clients against the seed's 4-stage ExampleCode for 10 minutes while a
# stage server is killed with SIGKILL every minute. Passes when no request
# failed or came back wrong and the coordinator's and stage servers'
# resident memory and thread counts at the end are within 10% of the first
# minute's. Prints the request table and the memory/threads table.
#
# Usage: tools/soak.sh [SECONDS [KILL_EVERY_S [CLIENTS]]]   (600 60 64)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
seconds=${1:-600}
every=${2:-60}
clients=${3:-64}
exec bazel test //tests:soak_test --test_output=all --nocache_test_results \
  --test_timeout=$((seconds + 600)) \
  --test_env=PIPESERVE_SOAK_SECONDS="$seconds" \
  --test_env=PIPESERVE_SOAK_KILL_EVERY_S="$every" \
  --test_env=PIPESERVE_SOAK_CLIENTS="$clients"
