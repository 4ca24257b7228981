#!/usr/bin/env bash
# Fuzzes pipeserve's input parsers with libFuzzer (clang, ASan, UBSan):
# model files through validation and partitioning, activation frames,
# KServe requests (protobuf, and REST JSON bodies) and LoadStage specs
# (fuzz/BUILD.bazel).
#
# Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60
#   TARGET              model_file_fuzz frame_fuzz kserve_request_fuzz kserve_json_fuzz text_request_fuzz stage_spec_fuzz
#                       (default: all)
#
# Each target starts from its seed corpus in fuzz/corpus/TARGET (never
# changed: new inputs go to a scratch corpus). A crash is written to
# fuzz/crashes/TARGET/ and fails the run; add the file to fuzz/corpus/TARGET
# once fixed, so the corpus test keeps it fixed. Ends with a table of
# executions per target.
set -uo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh || exit 1

seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(model_file_fuzz frame_fuzz kserve_request_fuzz kserve_json_fuzz text_request_fuzz stage_spec_fuzz)

# Its own output base: switching the C++ compiler would otherwise rebuild
# the normal configuration's outputs from scratch next time.
bazel_fuzz=(bazel --output_base="${PIPESERVE_FUZZ_OUTPUT_BASE:-$HOME/.cache/pipeserve-fuzz-bazel}")
labels=()
for t in "${targets[@]}"; do labels+=("//fuzz:$t"); done
if ! "${bazel_fuzz[@]}" build --config=fuzz "${labels[@]}" >/tmp/pipeserve-fuzz-build.log 2>&1; then
  cat /tmp/pipeserve-fuzz-build.log
  echo "fuzz: build failed" >&2
  exit 1
fi
bin=$("${bazel_fuzz[@]}" info --config=fuzz bazel-bin 2>/dev/null)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
printf '%-22s %8s %12s %10s %8s %s\n' target seconds executions exec/s corpus result
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "fuzz/crashes/$t"
  log="$work/$t.log"
  "$bin/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="fuzz/crashes/$t/" \
      "$work/$t" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(find "$work/$t" -type f | wc -l)
  result=ok
  if [ $rc -ne 0 ]; then
    result="CRASH (rc $rc): $(ls -t "fuzz/crashes/$t" | head -1)"
    failed=1
    grep -m1 -A20 "ERROR: \|runtime error\|==ERROR" "$log" >&2 || tail -30 "$log" >&2
  fi
  printf '%-22s %8s %12s %10s %8s %s\n' "$t" "$seconds" "${runs:-?}" "${rate:-?}" "$corpus" "$result"
  rmdir "fuzz/crashes/$t" 2>/dev/null
done
rmdir fuzz/crashes 2>/dev/null
exit $failed
