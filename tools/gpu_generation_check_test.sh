#!/usr/bin/env bash
# tools/gpu_generation_check.sh without a GPU: both of its stacks on the
# CPU (DEVICE=cpu), from the Bazel runfiles, on fixtures made here by
# PyTorch. Checks the script's own plumbing (servers, upload, generate,
# comparison) so its first GPU run fails only on the GPU's answers.
set -euo pipefail
root="${TEST_SRCDIR}/${TEST_WORKSPACE:-pipeserve}"
tmp="${TEST_TMPDIR:-$(mktemp -d)}"
mkdir -p "$tmp/bin"
for b in server/coordinator/coordinator server/stage/stage_server client/pipeserve; do
  ln -sf "$root/$b" "$tmp/bin/"
done
PYTHONPATH="$root/client/python" PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 \
  "$root/tests/pytorch/make_fixtures.py" --out "$tmp/fixtures" --case gpt2_gen --case llama_gen \
  > /dev/null
out=$(DEVICE=cpu BINDIR="$tmp/bin" FIXTURES="$tmp/fixtures" bash "$root/tools/gpu_generation_check.sh")
echo "$out"
[ "$(grep -c -- '-> PASS' <<< "$out")" -eq 6 ]
