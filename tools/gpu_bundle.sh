#!/usr/bin/env bash
# Builds out/gpu_bundle/: everything tools/gpu_check.sh needs to check the
# CUDA backend on a GPU machine that has the NVIDIA driver and the CUDA 13
# libraries but no Bazel and no Debian -dev packages. At most 60 MiB.
#
#   tools/gpu_bundle.sh          # here (needs /usr/local/cuda, PyTorch)
#   # then, on the GPU machine, from inside the folder:
#   bash gpu_check.sh            # < 5 minutes; a table last; log in $OUT
#
# Contents:
#   backend_test, conformance_test, cuda_backend_test, cuda_transformer_test,
#   cuda_generation_test, cuda_bench   -c opt, --config=cuda;
#       Abseil, protobuf, gtest, libstdc++ and libgcc linked statically
#   lib/   libdnnl.so.2 and what it needs (libgomp, libOpenCL, libstdc++),
#          libcudart.so.13; xz-compressed, unpacked by gpu_check.sh
#   fixtures/b16, fixtures/b256   ExampleCode exported from PyTorch here
#   fixtures/transformers   the GPT-2- and Llama-style test models (batch 2,
#       7 tokens; float32 and bfloat16) for cuda_transformer_test
#   fixtures/generation   the same exported for generation, for
#       cuda_generation_test
#   fixtures/tinyllama   a TinyLlama-1.1B-shaped graph exported for
#       generation, without weights (bench/llama_skeleton.py), for
#       cuda_bench's generation targets
#   bench/torch_eager.py with what it imports (tests/pytorch/models.py, the
#       pipeserve package under client/python, proto/*.proto): the PyTorch
#       baseline serving_bench runs from the bundle's folder
#   gpu_check.sh, gpu_serving_check.sh, MANIFEST (what was built from which
#       commit)
# cuBLAS and cuBLASLt (about 600 MB) are the GPU machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh

bundle=out/gpu_bundle
static_libs=out/gpu_bundle_static_libs
sys=/usr/lib/x86_64-linux-gnu
targets=(//runtime:backend_test //runtime/conformance:conformance_test
         //runtime/cuda:cuda_backend_test //tests:cuda_transformer_test
         //tests:cuda_generation_test //bench:cuda_bench
         //server/coordinator:coordinator //server/stage:stage_server //client:pipeserve //bench:serving)

# Static archives shadow the shared libraries of the same names: ld takes
# the first directory on its path holding either, and -L dirs come first.
rm -rf "$static_libs" "$bundle"
mkdir -p "$static_libs" "$bundle/lib"
for a in "$sys"/libabsl_*.a "$sys"/libprotobuf.a "$sys"/libgtest.a "$sys"/libgtest_main.a \
         "$sys"/libgmock.a "$sys"/libz.a "$sys"/libgrpc++.a "$sys"/libgrpc++_reflection.a \
         "$sys"/libgrpc.a "$sys"/libgpr.a "$sys"/libupb.a "$sys"/libaddress_sorting.a \
         "$sys"/libre2.a "$sys"/libcares.a "$sys"/libssl.a "$sys"/libcrypto.a; do
  ln -s "$a" "$static_libs/"
done

flags=(--config=cuda -c opt --dynamic_mode=off --strip=always
       "--linkopt=-L$PWD/$static_libs" --linkopt=-static-libstdc++ --linkopt=-static-libgcc
       '--linkopt=-Wl,-rpath,$ORIGIN/lib')
bazel build "${flags[@]}" "${targets[@]}"
bin=$(bazel info "${flags[@]}" bazel-bin 2>/dev/null)
install -m 755 "$bin/runtime/backend_test" "$bundle/backend_test"
install -m 755 "$bin/runtime/conformance/conformance_test" "$bundle/conformance_test"
install -m 755 "$bin/runtime/cuda/cuda_backend_test" "$bundle/cuda_backend_test"
install -m 755 "$bin/tests/cuda_transformer_test" "$bundle/cuda_transformer_test"
install -m 755 "$bin/tests/cuda_generation_test" "$bundle/cuda_generation_test"
install -m 755 "$bin/bench/cuda_bench" "$bundle/cuda_bench"
# The serving path: coordinator, stage server, CLI and bench/serving.
install -m 755 "$bin/server/coordinator/coordinator" "$bundle/coordinator"
install -m 755 "$bin/server/stage/stage_server" "$bundle/stage_server"
install -m 755 "$bin/client/pipeserve" "$bundle/pipeserve"
install -m 755 "$bin/bench/serving" "$bundle/serving_bench"

# Shared libraries the binaries still need besides glibc, the driver and
# cuBLAS: oneDNN (Debian ships no static one) and its dependencies, the
# CUDA runtime built against, and the HTTP server with its TLS (the
# coordinator's and stage servers' REST and metrics: libmicrohttpd and
# GnuTLS, whose Debian builds are shared only). Compressed to fit the size
# budget.
http_libs=(libmicrohttpd.so.12 libgnutls.so.30 libp11-kit.so.0 libidn2.so.0 libunistring.so.2
           libtasn1.so.6 libnettle.so.8 libhogweed.so.6 libgmp.so.10 libffi.so.8)
for so in "$sys/libdnnl.so.2" "$sys/libgomp.so.1" "$sys/libOpenCL.so.1" \
          "$sys/libstdc++.so.6" /usr/local/cuda/lib64/libcudart.so.13 \
          "${http_libs[@]/#/$sys/}"; do
  cp -L "$so" "$bundle/lib/"
done

# Nothing else outside the allowed set may be needed.
allowed='linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libgcc_s\.so|libcublas\.so|libcublasLt\.so|libcudart\.so|libdnnl\.so|libgomp\.so|libOpenCL\.so|libstdc\+\+\.so|libmicrohttpd\.so|libgnutls\.so|libp11-kit\.so|libidn2\.so|libunistring\.so|libtasn1\.so|libnettle\.so|libhogweed\.so|libgmp\.so|libffi\.so'
bad=0
for f in "$bundle"/backend_test "$bundle"/conformance_test "$bundle"/cuda_backend_test \
         "$bundle"/cuda_transformer_test "$bundle"/cuda_generation_test "$bundle"/cuda_bench \
         "$bundle"/coordinator "$bundle"/stage_server "$bundle"/pipeserve "$bundle"/serving_bench \
         "$bundle"/lib/*.so*; do
  extra=$(LD_LIBRARY_PATH="$bundle/lib" ldd "$f" | grep -vE "$allowed" || true)
  if [ -n "$extra" ]; then
    echo "gpu_bundle: $f needs libraries outside the bundle:" >&2
    echo "$extra" >&2
    bad=1
  fi
done
[ "$bad" -eq 0 ] || exit 1
xz -9 -T2 "$bundle"/lib/*
# The binaries too (the statically linked gRPC ones are ~18 MiB each):
# gpu_check.sh unpacks them next to the libraries.
for b in backend_test conformance_test cuda_backend_test cuda_transformer_test \
         cuda_generation_test cuda_bench \
         coordinator stage_server pipeserve serving_bench; do
  xz -9 -T2 "$bundle/$b"
done

# ExampleCode fixtures (model, inputs, PyTorch's outputs, float64 answer).
for b in 16 256; do
  /usr/bin/python3 tests/pytorch/make_fixtures.py --out "$bundle/fixtures/b$b" \
      --case example_code --batch "$b" > /dev/null
done
/usr/bin/python3 tests/pytorch/make_fixtures.py --out "$bundle/fixtures/transformers" \
    --case gpt2 --case llama --case gpt2_bf16 --case llama_bf16 --batch 2 > /dev/null
/usr/bin/python3 tests/pytorch/make_fixtures.py --out "$bundle/fixtures/generation" \
    --case gpt2_gen --case llama_gen > /dev/null
# cuda_bench's generation targets: a TinyLlama-1.1B-shaped graph without
# its weights (150 KB; cuda_bench makes random ones there).
/usr/bin/python3 bench/llama_skeleton.py --out "$bundle/fixtures/tinyllama" > /dev/null

cp tools/gpu_check.sh tools/gpu_serving_check.sh tools/gpu_generation_check.sh "$bundle/"
# bench/serving's same-run PyTorch baseline: bench/torch_eager.py, run from
# the bundle's folder, finds models.py and the pipeserve package by paths
# relative to itself, and pipeserve generates model.proto's code on first
# use (with protoc, where the GPU machine has it).
for f in bench/torch_eager.py tests/pytorch/models.py client/python/pipeserve/*.py proto/*.proto; do
  install -D -m 644 "$f" "$bundle/$f"
done
{
  echo "pipeserve GPU bundle"
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- runtime server bench client proto tests/pytorch tools third_party || echo ' (+ local changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version | head -1)"
  echo "nvcc: $(/usr/local/cuda/bin/nvcc --version | tail -1)"
} > "$bundle/MANIFEST"

# It must start here and say there is no GPU, cleanly.
selftest_logs=$(mktemp -d)
trap 'rm -rf "$selftest_logs"' EXIT
check=$(cd "$bundle" && OUT="$selftest_logs" bash gpu_check.sh --self-test 2>&1) || {
  echo "$check" >&2
  echo "gpu_bundle: the bundle does not start here" >&2
  exit 1
}
# Its PyTorch baseline must run from inside it (as gpu_serving_check.sh runs it).
(cd "$bundle" && /usr/bin/python3 bench/torch_eager.py --batch 16 --iters 1 | grep -q median_ms=) || {
  echo "gpu_bundle: bench/torch_eager.py does not run from inside the bundle" >&2
  exit 1
}
size=$(du -sm "$bundle" | cut -f1)
echo "gpu_bundle: $bundle is ${size} MiB"
if [ "$size" -gt 60 ]; then
  echo "gpu_bundle: over the 60 MiB budget" >&2
  exit 1
fi
