#!/usr/bin/env bash
# The pipeserve demo: export the seed's ExampleCode from PyTorch, cut it into
# its 4 pipeline stages, run them with microbatching, and compare with
# PyTorch. Exits non-zero if the outputs disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh

echo "== building"
bazel build //client:pipeserve 2>&1 | grep -E '^(ERROR|FAILED)' || true
cli=bazel-bin/client/pipeserve
[ -x "$cli" ] || { echo "build failed"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== exporting ExampleCode (d_hid 512, batch 64) with PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)')"
/usr/bin/python3 tests/pytorch/make_fixtures.py --out "$work" --case example_code --batch 64
case_dir="$work/example_code"

echo "== plan and local pipelined run (4 microbatches of 16)"
mkdir -p "$work/out"
"$cli" run-local --model "$case_dir/model.psm" \
  --input "x=$case_dir/in_x.npy" --input "y=$case_dir/in_y.npy" \
  --chunks 4 --repeat 20 --output_dir "$work/out"

echo "== comparison with PyTorch"
/usr/bin/python3 tools/compare_outputs.py "$case_dir" "$work/out"
