#!/usr/bin/env bash
# Generation through stage servers (run by gpu_check.sh from the GPU
# bundle): gpt2_gen and llama_gen (fixtures/generation) uploaded to a
# coordinator over two stage servers on $DEVICE (cuda:0 by default, every
# kernel allowed: --cuda_ops=unconfirmed), and to one over two CPU stage
# servers. Each prompt's tokens must be the same on both, greedy and drawn
# (temperature 4, top-k 20, top-p 0.95, a seed): prefill, then decode
# steps on the device's KV cache, the picks on the device. (float32 GEMMs
# on both: their logits differ by rounding only, so a draw differs only
# where it lands within rounding of a boundary.)
#
#   DEVICE=cpu tools/gpu_generation_check.sh   # both sides on the CPU: the
#                                              # script itself, without a GPU
# BINDIR (default: this folder) holds coordinator, stage_server and
# pipeserve; FIXTURES (default: ./fixtures/generation) the exported models.
# Exit 0 when every model's tokens agree.
set -u
cd "$(dirname "$0")"
here=$(pwd)
bindir=${BINDIR:-$here}
fixtures=${FIXTURES:-$here/fixtures/generation}
device=${DEVICE:-cuda:0}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

wait_file() {  # file: until it has content (60 s)
  for _ in $(seq 600); do [ -s "$1" ] && return 0; sleep 0.1; done
  return 1
}

# start_stack NAME DEVICE: two stage servers on DEVICE and a coordinator
# over them (static launcher); its address ends up in $tmp/NAME.address.
start_stack() {
  local name=$1 dev=$2 list="" i
  for i in 0 1; do
    "$bindir/stage_server" --host=127.0.0.1 --port=0 --port_file="$tmp/$name.stage$i" \
      --device="$dev" --cuda_ops=unconfirmed > "$tmp/$name.stage$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1; do
    if ! wait_file "$tmp/$name.stage$i"; then
      echo "stage server $i on $dev did not start:"; tail -5 "$tmp/$name.stage$i.log"; return 1
    fi
    list+="${list:+,}127.0.0.1:$(cat "$tmp/$name.stage$i")"
  done
  "$bindir/coordinator" --host=127.0.0.1 --port=0 --port_file="$tmp/$name.port" \
    --repository="$tmp/$name.repo" --metrics_port=-1 --http_port=-1 \
    --launcher=static --stage_servers="$list" > "$tmp/$name.coordinator.log" 2>&1 &
  pids+=($!)
  if ! wait_file "$tmp/$name.port"; then
    echo "coordinator on $dev did not start:"; tail -5 "$tmp/$name.coordinator.log"; return 1
  fi
  echo "127.0.0.1:$(cat "$tmp/$name.port")" > "$tmp/$name.address"
}

# tokens NAME MODEL PROMPT [FLAG...]: the token ids the stack NAME
# generates (greedy unless the flags say otherwise).
tokens() {
  local name=$1 model=$2 prompt=$3
  shift 3
  "$bindir/pipeserve" generate --server "$(cat "$tmp/$name.address")" --name "$model" \
    --prompt "$prompt" --max_tokens 8 "$@" 2> "$tmp/$name.$model.err" | head -1
}

start_stack device "$device" || exit 1
start_stack cpu cpu || exit 1
status=0
for model in gpt2 llama; do
  for stack in device cpu; do
    if ! "$bindir/pipeserve" upload --server "$(cat "$tmp/$stack.address")" --name "$model" \
           --model "$fixtures/${model}_gen/model.psm" > "$tmp/$stack.$model.upload" 2>&1; then
      echo "$model: upload to the $stack stack failed:"; tail -3 "$tmp/$stack.$model.upload"
      tail -3 "$tmp/$stack.coordinator.log"
      status=1
      continue 2
    fi
  done
  for run in "3,1,4,1,5" "9,2,6" "3,1,4,1,5 drawn"; do
    prompt=${run%% *}
    flags=()
    [ "$run" != "$prompt" ] && flags=(--temperature 4 --top_k 20 --top_p 0.95 --seed 7)
    got=$(tokens device "$model" "$prompt" "${flags[@]}")
    want=$(tokens cpu "$model" "$prompt" "${flags[@]}")
    if [ -n "$got" ] && [ "$got" = "$want" ]; then
      echo "$model on $device, prompt $run: $got (as on the CPU) -> PASS"
    else
      echo "$model on $device, prompt $run: '$got', CPU '$want' -> FAIL"
      tail -2 "$tmp/device.$model.err" "$tmp/cpu.$model.err"
      status=1
    fi
  done
done
exit $status
