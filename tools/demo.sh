#!/usr/bin/env bash
# The pipeserve demo: start a coordinator with API tokens (it starts one
# stage server per stage on this machine, which take calls only from it),
# export the seed's ExampleCode from PyTorch, upload it with the admin
# token, print its plan, send batches through the KServe v2 API with the
# Python client and the infer token, compare with PyTorch; then the same for
# a small GPT-2-style model with token ids in (tools/demo_gpt.py); and shut
# everything down. Exits non-zero if anything disagrees or fails; leaves no
# process running.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh

echo "== building"
bazel build //server/coordinator:coordinator //server/stage:stage_server //client:pipeserve 2>&1 \
  | grep -E '^(ERROR|FAILED)' && exit 1
cli=bazel-bin/client/pipeserve

work=$(mktemp -d)
coordinator_pid=""
cleanup() {
  if [ -n "$coordinator_pid" ] && kill -0 "$coordinator_pid" 2>/dev/null; then
    kill -TERM "$coordinator_pid"
    wait "$coordinator_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== making API tokens: one with the admin scope, one with infer"
umask 077
admin_token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
infer_token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'admin %s\ninfer %s\n' "$admin_token" "$infer_token" > "$work/tokens"
printf '%s\n' "$admin_token" > "$work/admin.token"

echo "== starting the coordinator (loopback only, tokens required; the local launcher"
echo "   starts one stage server per stage)"
bazel-bin/server/coordinator/coordinator --port=0 --port_file="$work/port" \
  --repository="$work/repository" --auth_tokens="$work/tokens" \
  --http_port=0 --http_port_file="$work/http_port" > "$work/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 300); do [ -s "$work/port" ] && break; sleep 0.1; done
[ -s "$work/port" ] || { cat "$work/coordinator.log"; exit 1; }
server="127.0.0.1:$(cat "$work/port")"
# Health turns SERVING once the (empty) store is loaded, a moment after the
# port is written: wait for it, as a probe would.
for _ in $(seq 50); do "$cli" health --server "$server" >/dev/null 2>&1 && break; sleep 0.1; done
"$cli" health --server "$server"

echo "== exporting ExampleCode (d_hid 512, batch 256) with PyTorch"
/usr/bin/python3 tests/pytorch/make_fixtures.py --out "$work" --case example_code --batch 256
case_dir="$work/example_code"

echo "== an upload without a token is refused"
if "$cli" upload --server "$server" --name example_code --model "$case_dir/model.psm" 2>"$work/refused"; then
  echo "the upload without a token went through"; exit 1
fi
cat "$work/refused"

echo "== uploading with the admin token (16 microbatches per request)"
"$cli" upload --server "$server" --token_file "$work/admin.token" --name example_code \
  --model "$case_dir/model.psm" --microbatches 16

echo "== plan"
"$cli" plan --server "$server" --token_file "$work/admin.token" --name example_code

echo "== inference through the KServe v2 API (Python client, infer token)"
PIPESERVE_TOKEN="$infer_token" /usr/bin/python3 tools/demo_client.py "$server" example_code "$case_dir"

echo "== a GPT-2-style transformer: int64 token ids in, any sequence length, 3 stages; then generation"
/usr/bin/python3 tools/demo_gpt.py "$server" "$work/admin.token" "$work"

echo "== the same over HTTP (KServe v2 REST): readiness, then tokens streamed as server-sent events"
http="http://127.0.0.1:$(cat "$work/http_port")"
curl -s -o /dev/null -w "GET /v2/health/ready: %{http_code}\n" "$http/v2/health/ready"
curl -sN --fail-with-body -H "Authorization: Bearer $infer_token" \
  -d '{"input_ids": [5, 17, 42], "max_tokens": 8}' "$http/v2/models/gpt-gen/generate_stream"
echo "== text in, text streamed out: OpenAI's /v1/completions (GPT-2's tokenizer; random weights)"
curl -sN --fail-with-body -H "Authorization: Bearer $infer_token" -H "Content-Type: application/json" \
  -d '{"model": "gpt2-text", "prompt": "Pipelines serve", "max_tokens": 8, "seed": 1, "stream": true}' \
  "$http/v1/completions"
echo "== shutting down"
pid=$coordinator_pid
coordinator_pid=""
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
if [ "$status" -ne 0 ]; then
  echo "the coordinator exited with status $status:"; tail -20 "$work/coordinator.log"; exit 1
fi
# Stage servers follow their coordinator within a second.
for _ in $(seq 20); do
  pgrep -f "parent_pid=$pid" > /dev/null || break
  sleep 0.1
done
if pgrep -f "parent_pid=$pid" > /dev/null; then
  echo "stage servers still running"; exit 1
fi
echo "done: all processes stopped"
