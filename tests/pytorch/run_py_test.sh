#!/usr/bin/env bash
# Runs a Python test with Debian's /usr/bin/python3 (the interpreter that has
# PyTorch) and the pipeserve package from the Bazel runfiles tree.
#
# Usage, from a sh_test: args = ["tests/pytorch/exporter_test.py"]; by hand:
#   tests/pytorch/run_py_test.sh tests/pytorch/exporter_test.py [-v]
set -euo pipefail

if [[ -n "${TEST_SRCDIR:-}" ]]; then
  root="${TEST_SRCDIR}/${TEST_WORKSPACE:-pipeserve}"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fi
script="$1"
shift

export PYTHONPATH="${root}/client/python${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 "${root}/${script}" "$@"
