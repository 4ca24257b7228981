#!/usr/bin/env bash
# The TSan shim must not hide real races: each mode of tsan_race_demo has
# one, and under --config=tsan each must die with a ThreadSanitizer data
# race report naming RacyIncrement. In other builds there is no TSan to
# report anything, so the test passes without running the races.
set -uo pipefail
demo="$1"

if [[ "$("$demo" probe)" != "tsan" ]]; then
  echo "SKIPPED: not a --config=tsan build"
  exit 0
fi

export TSAN_OPTIONS="halt_on_error=1:exitcode=66${TSAN_OPTIONS:+:${TSAN_OPTIONS}}"
failures=0
for mode in unlocked one_side_locked different_mutexes readers_write write_after_notify \
            grpc_callback; do
  out=$("$demo" "$mode" 2>&1)
  rc=$?
  if [[ $rc -eq 66 ]] && grep -q "WARNING: ThreadSanitizer: data race" <<<"$out" \
     && grep -q "RacyIncrement" <<<"$out"; then
    echo "ok    $mode: race reported"
  else
    echo "FAIL  $mode: exit $rc, expected a ThreadSanitizer data race report (exit 66)"
    echo "$out" | head -40
    failures=$((failures + 1))
  fi
done
exit $((failures > 0))
