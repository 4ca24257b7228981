#!/usr/bin/env bash
# The serving path on a GPU machine, from inside the GPU bundle (run by
# gpu_check.sh): a coordinator whose local launcher starts one stage server
# per GPU (--device=cuda:<i>), ExampleCode uploaded and queried with the
# pipeserve CLI and checked against PyTorch's float64 answer, then
# bench/serving with its stage servers on cuda:0, its PyTorch baseline
# (bench/torch_eager.py, shipped in the bundle with what it imports) run
# by a python3 here that has torch. Exit 0 when the output is right and
# the bench ran to its end.
set -u
cd "$(dirname "$0")"
here=$(pwd)
bindir=${BINDIR:-$here}
tmp=$(mktemp -d)
coordinator=""
cleanup() {
  [ -n "$coordinator" ] && kill -TERM "$coordinator" 2>/dev/null && wait "$coordinator" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
cli=("$bindir/pipeserve")
fx="$here/fixtures/b256/example_code"

"$bindir/coordinator" --port=0 --host=127.0.0.1 --port_file="$tmp/port" \
  --repository="$tmp/repo" --metrics_port=-1 --http_port=-1 \
  --stage_server_binary="$bindir/stage_server" > "$tmp/coordinator.log" 2>&1 &
coordinator=$!
for _ in $(seq 300); do [ -s "$tmp/port" ] && break; sleep 0.1; done
if [ ! -s "$tmp/port" ]; then echo "coordinator did not start:"; cat "$tmp/coordinator.log"; exit 1; fi
server="127.0.0.1:$(cat "$tmp/port")"
"${cli[@]}" health --server "$server" || exit 1
"${cli[@]}" upload --server "$server" --name ec --model "$fx/model.psm" --microbatches 4 2>/dev/null || {
  echo "upload failed"; cat "$tmp/coordinator.log"; cat /tmp/stage-*.log 2>/dev/null | tail -20; exit 1; }
"${cli[@]}" plan --server "$server" --name ec | head -3
grep -h "stage_server" /tmp/stage-0.*.log 2>/dev/null | head -3
for i in 1 2 3; do
  "${cli[@]}" infer --server "$server" --name ec --input "x=$fx/in_x.npy" --input "y=$fx/in_y.npy" \
    --output_dir "$tmp/out" | tail -1
done
py=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" > /dev/null && "$p" -c "import numpy" 2> /dev/null; then py=$p; break; fi
done
[ -n "$py" ] || { echo "no python3 with numpy to check the output"; exit 1; }
"$py" - "$fx" "$tmp/out" <<'PY' || exit 1
import sys, numpy as np
fx, out = sys.argv[1], sys.argv[2]
got = np.load(out + "/relu_2.npy").astype(np.float64)
exact = np.load(fx + "/out64hi_0.npy").astype(np.float64) + np.load(fx + "/out64lo_0.npy")
torch32 = np.load(fx + "/out_0.npy").astype(np.float64)
err = np.max(np.abs(got - exact)) / np.max(np.abs(exact))
terr = np.max(np.abs(torch32 - exact)) / np.max(np.abs(exact))
ok = got.shape == exact.shape and err < 1e-5
print(f"served on the GPU: output {list(got.shape)}, max|err|/max|ref| vs float64 {err:.2e} "
      f"(PyTorch float32 on CPU: {terr:.2e}) -> {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
status=$?
kill -TERM "$coordinator"; wait "$coordinator" 2>/dev/null; coordinator=""

# The python3 that runs bench/torch_eager.py from here: it must print a time.
torch_py=""
for p in python3 /usr/bin/python3; do
  command -v "$p" > /dev/null || continue
  if timeout 60 "$p" bench/torch_eager.py --batch 16 --iters 1 2> "$tmp/torch_py.log" |
       grep -q median_ms=; then
    torch_py=$(command -v "$p")
    break
  fi
done
if [ -z "$torch_py" ]; then
  echo "no PyTorch baseline: no python3 here runs bench/torch_eager.py" \
    "($(tail -1 "$tmp/torch_py.log" 2>/dev/null)); its rows print n/a"
fi
echo "== bench/serving, stage servers on cuda:0 (one process)"
serving_bench() {  # section, then flags
  timeout 120 "$bindir/serving_bench" "$@" --device=cuda:0 ${torch_py:+"--python=$torch_py"}
  local rc=$?
  [ "$rc" -eq 0 ] || { echo "bench/serving $1: exit status $rc"; status=1; }
}
serving_bench hop
serving_bench e2e --fixtures="$here/fixtures/b256"
exit $status
