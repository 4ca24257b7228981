#!/usr/bin/env bash
# Checks pipeserve's CUDA backend on a GPU machine, from inside the folder
# tools/gpu_bundle.sh builds (out/gpu_bundle/). Needs only the NVIDIA driver,
# the CUDA 13 cuBLAS libraries and coreutils; finishes in under 8 minutes
# (each step has its own timeout) and always ends with a summary table, even
# when a step fails. Logs go to $OUT when that is set (else ./logs).
#
#   bash gpu_check.sh              # on the GPU machine
#   bash gpu_check.sh --self-test  # on a machine without a GPU: the bundle
#                                  # starts, finds its libraries and says
#                                  # "no CUDA device" cleanly (exit 0)
#
# Steps: backend_test (the op suite: every op on cuda_fp32/tf32/bf16 against
# a float64 reference, buffers NaN-poisoned, fresh random inputs),
# conformance_test (the op registry's cases, every op in every dtype, on the
# CPU and on the CUDA backend where it has a kernel; coverage per dtype),
# transformers (cuda_transformer_test: GPT-2- and Llama-style models, every
# stage on the CUDA backend with every kernel allowed, float32 and bf16,
# against PyTorch's float64 answer; and bfloat16 models), generation
# (cuda_generation_test: the same models exported for generation, a prefill
# and decode steps on the CUDA backend next to the CPU's), cuda_backend_test
# (CUDA graphs vs
# op-by-op over two shapes, shape cache,
# concurrent runs on one program's slots, errors), cuda_bench (ExampleCode
# GPU vs CPU, GEMM TFLOP/s vs cuBLAS, stage latency with/without graphs,
# LocalPipeline throughput, copy/compute overlap: 1 thread x 1 slot vs 2
# threads x 2 slots; the generation targets: a TinyLlama-1.1B-shaped model's
# prefill FLOP/s and decode bandwidth as shares of the card's limits),
# serving (gpu_serving_check.sh: ExampleCode through a coordinator and stage
# servers on the GPU, and bench/serving), generation_served
# (gpu_generation_check.sh: GPT-2 and Llama generation through stage
# servers on cuda:0 with every kernel allowed, tokens against CPU ones).
# Exit status: 0 all passed; 1 something failed; 3 no GPU (nothing checked).
# Where a GPU is present (nvidia-smi lists one, or cuda_bench ran on it), a
# test case that skipped (GTEST_SKIP, "[  SKIPPED ]") checked nothing: the
# check fails and names it, as it does when nvidia-smi lists a GPU that
# CUDA cannot find.
set -u
cd "$(dirname "$0")"
here=$(pwd)
self_test=0
[ "${1:-}" = "--self-test" ] && self_test=1

logdir=${OUT:-$here/logs}
mkdir -p "$logdir" 2>/dev/null || logdir=$(mktemp -d)
log="$logdir/gpu_check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
start=$(date +%s)

# --- libraries ---------------------------------------------------------------
libdir=$(mktemp -d "${TMPDIR:-/tmp}/pipeserve_gpu_lib.XXXXXX")
unzip_to() {  # file.xz (or .gz) destination
  case "$1" in
    *.xz)
      if command -v xz > /dev/null; then
        xz -dc "$1" > "$2"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
      fi ;;
    *)
      if command -v gzip > /dev/null; then
        gzip -dc "$1" > "$2"
      else
        python3 -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
      fi ;;
  esac
}
for f in lib/*.xz lib/*.gz; do
  [ -e "$f" ] || continue
  b=$(basename "$f")
  unzip_to "$f" "$libdir/${b%.*}"
done
for f in lib/*.so*; do  # uncompressed copies, if any
  case "$f" in *.gz|*.xz) ;; *) [ -e "$f" ] && cp "$f" "$libdir/" ;; esac
done
# cuBLAS/cuBLASLt 13: the machine's CUDA toolkit, else PyTorch's wheels.
cublas_dir=""
for d in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
         /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  if [ -e "$d/libcublasLt.so.13" ]; then cublas_dir=$d; break; fi
done
if [ -z "$cublas_dir" ] && command -v python3 > /dev/null; then
  cublas_dir=$(timeout 30 python3 -c 'import os, nvidia.cublas as c; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null || true)
  [ -e "$cublas_dir/libcublasLt.so.13" ] || cublas_dir=""
fi
if [ -z "$cublas_dir" ]; then
  cublas_dir=$(timeout 60 find / -xdev -name libcublasLt.so.13 2>/dev/null | head -1 | xargs -r dirname)
fi
export LD_LIBRARY_PATH="$libdir${cublas_dir:+:$cublas_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The binaries come compressed (xz): unpack them beside the libraries.
bindir=$libdir
bins=()
for f in *.xz *.gz; do
  [ -e "$f" ] || continue
  b=${f%.*}
  unzip_to "$f" "$bindir/$b" && chmod +x "$bindir/$b" && bins+=("$b")
done

say "== pipeserve GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ -f MANIFEST ] && sed 's/^/   /' MANIFEST | tee -a "$log"
say "   host: $(uname -m), $(ldd --version 2>&1 | head -1)"
say "   cuBLAS: ${cublas_dir:-NOT FOUND}"
gpu="none"
smi_gpus=0  # GPUs nvidia-smi lists
if command -v nvidia-smi > /dev/null; then
  gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
  smi_gpus=$(timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
say "   GPU: $gpu"
missing=$(ldd "$bindir/cuda_bench" 2>&1 | grep "not found" || true)
[ -n "$missing" ] && say "   missing libraries: $missing"

# --- steps -------------------------------------------------------------------
declare -a names statuses secs
run_step() {  # name timeout_seconds command...
  local name=$1 limit=$2
  shift 2
  local t0 rc status
  t0=$(date +%s)
  say "-- $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$logdir/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT(${limit}s)" ;;
    2) if grep -q "no CUDA device" "$logdir/$name.log"; then status="NO-GPU"; else status="FAIL(rc=2)"; fi ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  names+=("$name")
  statuses+=("$status")
  secs+=("$(($(date +%s) - t0))")
  say "   $status in $(($(date +%s) - t0))s; log: $logdir/$name.log"
  tail -n 3 "$logdir/$name.log" | sed 's/^/   | /' | tee -a "$log"
  return 0
}

run_step backend_test 100 "$bindir/backend_test"
run_step conformance_test 60 "$bindir/conformance_test"
run_step transformers 60 env PIPESERVE_TRANSFORMER_FIXTURES="$here/fixtures/transformers" \
  "$bindir/cuda_transformer_test" --gtest_filter='*cuda*'
run_step generation 60 env PIPESERVE_GENERATION_FIXTURES="$here/fixtures/generation" \
  "$bindir/cuda_generation_test" --gtest_filter='*CudaBackend*'
run_step cuda_backend_test 60 "$bindir/cuda_backend_test"
run_step cuda_bench 210 "$bindir/cuda_bench" --fixtures "$here/fixtures" --iters 200
if [ "$self_test" -eq 0 ] && [ -e "$bindir/coordinator" ]; then
  run_step serving 240 env BINDIR="$bindir" bash "$here/gpu_serving_check.sh"
  # GPT-2 and Llama generation through stage servers on cuda:0 against CPU ones.
  run_step generation_served 60 env BINDIR="$bindir" bash "$here/gpu_generation_check.sh"
fi

# --- summary -----------------------------------------------------------------
no_device=0
grep -q "no CUDA device" "$logdir/cuda_bench.log" 2>/dev/null && no_device=1
prefix=cuda
[ "$self_test" -eq 1 ] && prefix=emulated  # the same plans, run on the CPU

{
  echo
  echo "================ pipeserve GPU check: summary ================"
  echo "GPU: $gpu"
  printf "%-20s %-16s %s\n" step status seconds
  for i in "${!names[@]}"; do
    printf "%-20s %-16s %s\n" "${names[$i]}" "${statuses[$i]}" "${secs[$i]}"
  done
  gtest_counts() {
    local f="$logdir/$1.log"
    printf "%-20s passed %s, failed %s, skipped %s\n" "$1" \
      "$(grep -cE '^\[       OK \]' "$f" 2>/dev/null)" \
      "$(grep -cE '^\[  FAILED  \] .*\([0-9]+ ms\)' "$f" 2>/dev/null)" \
      "$(grep -cE '^\[  SKIPPED \] .*\([0-9]+ ms\)' "$f" 2>/dev/null)"
  }
  gtest_counts backend_test
  gtest_counts conformance_test
  gtest_counts transformers
  gtest_counts generation
  gtest_counts cuda_backend_test
  grep -h '^\[ max_rel_err \] cuda' "$logdir/transformers.log" 2>/dev/null | sed 's/^/  /'
  grep -h '^\[ max_rel_err \] .*_cuda' "$logdir/generation.log" 2>/dev/null | sed 's/^/  /'
  # The op registry's cases per dtype: what the CUDA backend covers, what it refuses.
  grep -h '^\[ coverage \]' "$logdir/conformance_test.log" 2>/dev/null | sed 's/^/  /'
  # What this run confirms: lines for runtime/cuda/gpu_results/confirmed_kernels.txt
  # (commit them with this log, renamed to its card and date).
  grep -h '^\[ confirms \]' "$logdir/conformance_test.log" 2>/dev/null |
    sed 's/^\[ confirms \] \(.*\)/\1 gpu_check.log/' > "$logdir/confirmed_kernels.add"
  echo "  kernels confirmed by this run: $(wc -l < "$logdir/confirmed_kernels.add")" \
       "(lines in $logdir/confirmed_kernels.add)"
  grep -hE '^\[  FAILED  \] .*\([0-9]+ ms\)' "$logdir/conformance_test.log" 2>/dev/null |
    sed 's/, where GetParam.*//; s/^/  /' | head -20
  # How many slots the concurrent-run tests' programs made (2..4: runs overlapped).
  grep -h '^\[ slots \]' "$logdir/cuda_backend_test.log" 2>/dev/null | sed 's/^/  /' | head -6
  grep -hE '^\[  FAILED  \] .*\([0-9]+ ms\)' "$logdir/backend_test.log" \
      "$logdir/cuda_backend_test.log" 2>/dev/null | sed 's/, where GetParam.*//; s/^/  /' | head -20
  echo
  echo "Op tests, $prefix backends vs float64 reference: max |err| / max |ref|"
  echo "(ok: under fp32 1e-5, tf32 1e-3, bf16 1e-2; pass: an error-path test passed;
 FAIL: an assertion failed, e.g. a NaN left by an unwritten element; skip: no GPU)"
  awk -v p="$prefix" '
    /^\[ RUN      \] AllBackends\/BackendTest\./ {
      split($0, a, "BackendTest."); split(a[2], b, "/");
      if (b[2] ~ "^" p "_") { if (!(b[1] in seen)) { seen[b[1]] = 1; order[n++] = b[1] } }
    }
    /^\[ max_rel_err \]/ { v[$4 "|" $5] = $6; tol[$4] = $8 }
    /^\[  FAILED  \] AllBackends\/BackendTest\..*\(/ {
      split($0, a, "BackendTest."); split(a[2], b, "[/ ,]"); v[b[2] "|" b[1]] = "FAIL"
    }
    /^\[       OK \] AllBackends\/BackendTest\./ {
      split($0, a, "BackendTest."); split(a[2], b, "[/ ]");
      if (!((b[2] "|" b[1]) in v)) v[b[2] "|" b[1]] = "pass"
    }
    /^\[  SKIPPED \] AllBackends\/BackendTest\./ {
      split($0, a, "BackendTest."); split(a[2], b, "[/ ]"); v[b[2] "|" b[1]] = "skip"
    }
    END {
      printf "%-52s %-13s %-13s %-13s\n", "test", p "_fp32", p "_tf32", p "_bf16";
      fails = 0;
      for (i = 0; i < n; i++) {
        t = order[i]; line = sprintf("%-52s", t);
        split("fp32 tf32 bf16", ps, " ");
        for (j = 1; j <= 3; j++) {
          k = p "_" ps[j] "|" t; s = (k in v) ? v[k] : "-";
          if (s ~ /^[0-9]/) { lim = (ps[j] == "fp32") ? 1e-5 : (ps[j] == "tf32") ? 1e-3 : 1e-2;
                              s = s ((s + 0 < lim) ? " ok" : " HIGH"); if (s ~ /HIGH/) fails++ }
          if (s == "FAIL") fails++;
          line = line sprintf(" %-13s", s);
        }
        print line;
      }
      if (n == 0) print "(no op tests ran)";
    }' "$logdir/backend_test.log" 2>/dev/null
  echo
  if [ "$no_device" -eq 1 ]; then
    echo "cuda_bench: $(grep -m1 'no CUDA device' "$logdir/cuda_bench.log")"
  else
    echo "cuda_bench (full output in $logdir/cuda_bench.log):"
    sed -n '/^== /,$p' "$logdir/cuda_bench.log" 2>/dev/null | grep -v '^$' | head -160
  fi
  echo
  echo "total: $(($(date +%s) - start))s; logs in $logdir"
} 2>&1 | tee -a "$log"
rm -rf "$libdir"

failed=0
for s in "${statuses[@]}"; do [ "$s" = PASS ] || failed=1; done
status_of() {  # step name -> its status
  local i
  for i in "${!names[@]}"; do [ "${names[$i]}" = "$1" ] && echo "${statuses[$i]}"; done
}
# Test cases that skipped, by name: "[  SKIPPED ] Suite.Case (N ms)", a
# parameterized one with ", where GetParam() = ..." before the time.
skipped_cases() {
  grep -hE '^\[  SKIPPED \] .*\([0-9]+ ms\)' "$logdir/backend_test.log" \
      "$logdir/conformance_test.log" "$logdir/transformers.log" "$logdir/generation.log" \
      "$logdir/cuda_backend_test.log" 2>/dev/null |
    sed -E 's/^\[  SKIPPED \] //; s/, where GetParam\(\).*//; s/ \([0-9]+ ms\)$//'
}
if [ "$self_test" -eq 1 ]; then
  # Without a GPU: the tests pass (GPU cases skipped), the bench refuses cleanly.
  if [ "$no_device" -eq 1 ] && [ "$(status_of backend_test)" = PASS ] &&
     [ "$(status_of conformance_test)" = PASS ] && [ "$(status_of transformers)" = PASS ] &&
     [ "$(status_of generation)" = PASS ] &&
     [ "$(status_of cuda_backend_test)" = PASS ] && [ -z "$missing" ]; then
    echo "self-test: OK (bundle starts, finds its libraries, reports no CUDA device)"
    exit 0
  fi
  echo "self-test: FAILED"
  exit 1
fi
gpu_present=0
if [ "$smi_gpus" -gt 0 ] || { [ "$no_device" -eq 0 ] && [ "$(status_of cuda_bench)" = PASS ]; }; then
  gpu_present=1
fi
if [ "$gpu_present" -eq 1 ]; then
  # The one case that skips because a device is present.
  expected='^CudaBackendErrorTest\.NoDeviceMeansFailedPreconditionSayingWhy$'
  skipped=$(skipped_cases | grep -vE "$expected")
  if [ -n "$skipped" ]; then
    say "GPU test cases skipped where a GPU is present (nvidia-smi: $gpu; cuda_bench: $(status_of cuda_bench)): $(echo "$skipped" | wc -l)"
    echo "$skipped" | head -40 | sed 's/^/  /' | tee -a "$log"
    failed=1
  fi
fi
if [ "$no_device" -eq 1 ] && [ "$gpu_present" -eq 1 ]; then
  say "RESULT: nvidia-smi lists $smi_gpus GPU(s), but CUDA found no device; see $logdir/cuda_bench.log"
  exit 1
fi
if [ "$no_device" -eq 1 ]; then
  echo "RESULT: no CUDA device here, nothing was checked on a GPU"
  exit 3
fi
if [ "$failed" -eq 0 ]; then
  echo "RESULT: all steps passed"
elif [ -n "${skipped:-}" ] && ! printf '%s\n' "${statuses[@]}" | grep -qv '^PASS$'; then
  echo "RESULT: every step passed, but GPU test cases skipped (listed above)"
else
  echo "RESULT: some steps failed"
fi
exit "$failed"
