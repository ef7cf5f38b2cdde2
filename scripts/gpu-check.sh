#!/usr/bin/env bash
# Proves the worker on a real GPU with a model of GPT-J-6B's shape (random weights, float16), in three parts:
#
#   serve   what users see: the gateway and one worker (its batch size and KV budget the device defaults),
#           16 / 64 / 128 / 256 concurrent jobs of 128 prompt / 128 new tokens arriving 10 ms apart,
#           greedy and mixed strategies (6 greedy : 3 seeded sampling : 1 contrastive), streamed through
#           the OpenAI route: tokens/s, time to first token p50/p99, inter-token latency p50/p99, and the
#           worker's split of its steps (prefill / selection / forward / cache maintenance, from its
#           metrics); scripts/gpu_serve.py
#   batch   `worker generate --batch N` (N = 1, 16, 64, 128, 256; 128 in / 128 out, EOS ignored): tokens/s
#           over the call and decode-only (N / median step), against batch 1, the bandwidth bound and
#           transformers' batched greedy
#   parity  logits and greedy tokens against transformers, batch-1 speed against transformers and the
#           bandwidth bound (HBM read bandwidth from read-only reductions), a split over cuda:0 + CPU gives
#           the same tokens
#
# One run, at most GPU_CHECK_BUDGET_S (420 s: with the machine's start, inside 8 minutes of device time);
# parts and batch sizes that would not fit are skipped and say so. Prints one report and writes the whole
# log under $OUT (or ./gpu-check-out).
#
#   bash scripts/gpu-check.sh                       # every part, in the order above
#   bash scripts/gpu-check.sh --parts serve,batch   # issue 16's figures only (about 5 minutes)
#   scripts/gpu-check.sh --dry-run                  # the same steps on a CPU machine in ~2 minutes: the tiny
#                                                   # model, float32, small sizes (scripts/test.sh runs it)
#
# Prepare on the CPU build machine:   scripts/build-gpu-bundle.sh   (worker + gateway binaries, transformers
#                                                                    wheels)
# Run on the GPU machine (device tool): bash scripts/gpu-check.sh    with carry: target/gpu-bundle, .whl
# The serve part needs Redis and RabbitMQ: those listening on 6379 and 5672, else redis-server and
# rabbitmq-server from the PATH; without them it is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY="${GPU_CHECK_DRY_RUN:-0}"
PARTS="${GPU_CHECK_PARTS:-serve,batch,parity}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --parts) PARTS="${2:?--parts needs a list}"; shift ;;
    --parts=*) PARTS="${1#--parts=}" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${PARTS//,/ }; do
  case "$p" in serve|batch|parity) ;; *) echo "unknown part: $p (serve, batch, parity)" >&2; exit 2 ;; esac
done
has_part() { case ",$PARTS," in *",$1,"*) return 0 ;; esac; return 1; }

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

WORKER="${WORKER_BIN:-target/gpu-bundle/worker}"
GATEWAY="${GATEWAY_BIN:-target/gpu-bundle/gateway}"
PROMPT="The quick brown fox jumps over the lazy dog, and then"
if [ "$DRY" = 1 ]; then
  # The same steps on a CPU machine: the tiny random GPT-J in float32, small sizes (cuda:0 becomes cpu).
  export GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 GPU_CHECK_DTYPE=float32
  MODEL="${GPU_CHECK_MODEL:-/tmp/gpu-check-tiny}"; DTYPE=float32; DEV=cpu
  SPLIT_MAP='cpu=0-1'; SPLIT_BUDGET='cpu=1GiB'
  NEW="${GPU_CHECK_NEW_TOKENS:-8}"; SPLIT_NEW="${GPU_CHECK_SPLIT_NEW_TOKENS:-4}"
  BATCHES="${GPU_CHECK_BATCHES:-1 2 4}"; BATCH_IN="${GPU_CHECK_BATCH_PROMPT_TOKENS:-16}"
  BATCH_NEW="${GPU_CHECK_BATCH_NEW_TOKENS:-8}"; HF_BATCHES="${GPU_CHECK_HF_BATCHES:-1 2}"
  SERVE_JOBS="${GPU_CHECK_SERVE_JOBS:-2 4}"; SERVE_NEW="${GPU_CHECK_SERVE_NEW_TOKENS:-8}"
  BUDGET="${GPU_CHECK_BUDGET_S:-240}"; LOAD_S=5; READY_S=120
  # On the build machine: the project's virtualenv and whichever build is there, the newer first.
  if ! python3 -c 'import torch' 2>/dev/null && [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
  newest() { local best=""; for b in "$@"; do [ -x "$b" ] && { [ -z "$best" ] || [ "$b" -nt "$best" ]; } && best="$b"; done; echo "$best"; }
  [ -z "${WORKER_BIN:-}" ] && [ ! -x "$WORKER" ] && WORKER="$(newest target/release/worker target/debug/worker)"
  [ -z "${GATEWAY_BIN:-}" ] && [ ! -x "$GATEWAY" ] && GATEWAY="$(newest target/release/gateway target/debug/gateway)"
else
  MODEL="${GPU_CHECK_MODEL:-/tmp/gptj-6b-random}"; DTYPE=float16; DEV=cuda:0
  SPLIT_MAP='cuda:0=0-13'; SPLIT_BUDGET='cuda:0=6GiB,cpu=100GiB'
  NEW="${GPU_CHECK_NEW_TOKENS:-128}"; SPLIT_NEW="${GPU_CHECK_SPLIT_NEW_TOKENS:-16}"
  BATCHES="${GPU_CHECK_BATCHES:-1 16 64 128 256}"; BATCH_IN="${GPU_CHECK_BATCH_PROMPT_TOKENS:-128}"
  BATCH_NEW="${GPU_CHECK_BATCH_NEW_TOKENS:-128}"; HF_BATCHES="${GPU_CHECK_HF_BATCHES:-1 16 64}"
  SERVE_JOBS="${GPU_CHECK_SERVE_JOBS:-16 64 128 256}"; SERVE_NEW="${GPU_CHECK_SERVE_NEW_TOKENS:-128}"
  BUDGET="${GPU_CHECK_BUDGET_S:-420}"; LOAD_S=30; READY_S=300 # a 12 GB load from the page cache, generously
fi
STAGGER_MS="${GPU_CHECK_STAGGER_MS:-10}"
export GPU_CHECK_NEW_TOKENS="$NEW" GPU_CHECK_BATCH_NEW_TOKENS="$BATCH_NEW" GPU_CHECK_HF_BATCHES="$HF_BATCHES"
fail=0
step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }
left() { echo $((BUDGET - SECONDS - 15)); } # 15 s for the summary and slack
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
status_json() { python3 -c 'import json,sys; print(json.dumps(dict(status=sys.argv[1])))' "$1"; }

# transformers 4.55.4 (contrastive search built in) and the versions it needs, carried as wheels.
if [ -d .whl ] && has_part parity; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "worker: $WORKER  gateway: $GATEWAY  parts: $PARTS  budget: ${BUDGET}s$([ "$DRY" = 1 ] && echo '  (dry run)')"

step "1. CUDA inside the worker binary"
"$WORKER" info --json | tee "$OUT/info.json" || { echo "FAIL: $WORKER info"; exit 1; }
[ "$DRY" = 1 ] || python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["cuda_available"] else 1)' "$OUT/info.json" \
  || { echo "FAIL: tch::Cuda::is_available() is false in the worker binary"; exit 1; }

step "2. random checkpoint ($([ "$DRY" = 1 ] && echo 'the tiny GPT-J, float32' || echo "GPT-J-6B's shape, float16, sharded safetensors"))"
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  if [ "$DRY" = 1 ]; then
    "$WORKER" init-tiny-model "$MODEL" >/dev/null || exit 1
  else
    python3 scripts/gpu_check.py make-checkpoint "$MODEL" || exit 1
  fi
fi
cp shared/assets/gptj-tokenizer.json "$MODEL/tokenizer.json"
du -sh "$MODEL"
# The batch and service prompt: whole words, exactly $BATCH_IN tokens as the worker encodes it (no special
# tokens added), characters the gateway's prompt rules keep.
python3 scripts/gpu_check.py make-prompt shared/assets/gptj-tokenizer.json "$BATCH_IN" "$OUT/batch-prompt.txt" || exit 1
BATCH_PROMPT="$(cat "$OUT/batch-prompt.txt")"
export GPU_CHECK_BATCH_PROMPT="$OUT/batch-prompt.txt"

# ---------------------------------------------------------------------------------------------------------
step "3. serve: gateway + one worker ($DTYPE, device defaults), $BATCH_IN tokens in / $SERVE_NEW out, ${SERVE_JOBS// /, } jobs ${STAGGER_MS} ms apart, greedy and mixed"
start_services() { # Redis and RabbitMQ: running, or started from the PATH
  if ! port_open 6379 && command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  fi
  if ! port_open 5672 && command -v rabbitmq-server >/dev/null; then rabbitmq-server -detached; fi
  for _ in $(seq 120); do port_open 6379 && port_open 5672 && return 0; sleep 0.5; done
  return 1
}
serve_part() {
  if [ "$(left)" -lt $((LOAD_S * 3)) ]; then
    echo "serve: skipped, $(left) s left of GPU_CHECK_BUDGET_S=$BUDGET"; status_json "skipped (time budget)" >"$OUT/serve.json"; return
  fi
  if [ ! -x "$GATEWAY" ]; then
    echo "serve: skipped, no gateway binary at $GATEWAY"; status_json "skipped (no gateway binary)" >"$OUT/serve.json"; return
  fi
  if ! start_services; then
    echo "serve: skipped, no Redis on 6379 and RabbitMQ on 5672, and none to start (redis-server, rabbitmq-server)"
    status_json "skipped (no Redis / RabbitMQ)" >"$OUT/serve.json"; return
  fi
  local ns="gpucheck$$" port="${GPU_CHECK_GATEWAY_PORT:-18190}" mport="${GPU_CHECK_METRICS_PORT:-19190}"
  # The 128-token prompt is ~580 characters: over the 200 of builds whose routes all cleaned prompts (the
  # OpenAI routes and /v1/jobs now take them as written, bounded in tokens).
  export PROMPT_MAX_CHARS=100000
  RUST_LOG=warn "$GATEWAY" --listen "127.0.0.1:$port" --namespace "$ns" \
    --submit-rate-limit 1000000000/1s --read-rate-limit 1000000000/1s --token-rate-limit 1000000000/1s \
    --max-active-jobs-per-client 0 >"$OUT/gateway.log" 2>&1 &
  local gw=$!
  RUST_LOG=info LOG_FORMAT=text "$WORKER" serve --model "$MODEL" --dtype "$DTYPE" --device "$DEV" --namespace "$ns" \
    --worker-id gpu-check --metrics-listen "127.0.0.1:$mport" >"$OUT/worker-serve.log" 2>&1 &
  local wk=$!
  local ready=0
  for _ in $(seq $((READY_S * 5))); do
    if ! kill -0 "$wk" 2>/dev/null || ! kill -0 "$gw" 2>/dev/null; then break; fi
    if grep -q "consuming jobs" "$OUT/worker-serve.log" && curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; then
      ready=1; break
    fi
    sleep 0.2
  done
  # The limits the worker chose from the device (none given): its dtype's batch size and KV budget.
  grep -m1 "continuous batching" "$OUT/worker-serve.log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/.*continuous batching/worker: continuous batching/'
  # The parts after this one keep their share of the budget.
  local reserve=0
  has_part batch && reserve=$((reserve + LOAD_S * 3))
  has_part parity && reserve=$((reserve + LOAD_S * 4))
  if [ "$ready" = 1 ]; then
    python3 scripts/gpu_serve.py --base "http://127.0.0.1:$port" --metrics "http://127.0.0.1:$mport/metrics" \
      --prompt-file "$OUT/batch-prompt.txt" --concurrency "$SERVE_JOBS" --new-tokens "$SERVE_NEW" \
      --stagger-ms "$STAGGER_MS" --deadline-s "$(( $(left) - reserve ))" --out "$OUT/serve.json" \
      || { echo "FAIL: the service run"; fail=1; }
  else
    echo "FAIL: the gateway or the worker did not start"; tail -5 "$OUT/gateway.log" "$OUT/worker-serve.log"; fail=1
    status_json "failed to start" >"$OUT/serve.json"
  fi
  kill -TERM "$wk" 2>/dev/null; wait "$wk" 2>/dev/null
  kill -TERM "$gw" 2>/dev/null; wait "$gw" 2>/dev/null
  # On a shared broker (a dry run), the run's queues and keys go too.
  if [ "$DRY" = 1 ] && [ -f scripts/lib.sh ]; then (source scripts/lib.sh && delete_namespace "$ns"); fi
}
if has_part serve; then serve_part; else echo "serve: not asked (--parts)"; fi

# ---------------------------------------------------------------------------------------------------------
step "4. batch: worker generate --batch N, $DTYPE, $BATCH_IN tokens in / $BATCH_NEW out, EOS ignored, N = ${BATCHES// /, }"
# One process per batch size (each loads the model again, from the page cache). A size runs twice (the
# faster run counts) when twice its worst-case time -- the last size's time scaled by the batch ratio, as if
# batching gained nothing -- fits the budget, once when once fits, and is skipped otherwise.
batch_json() { python3 -c 'import json,sys; print(json.dumps(dict(batch=int(sys.argv[1]), status=sys.argv[2])))' "$1" "$2"; }
batch_part() {
  local help eos
  help="$("$WORKER" generate --help 2>/dev/null)"
  if ! grep -q -- '--batch' <<<"$help"; then
    echo "worker generate has no --batch flag: the batching rows say 'flag missing'"
    for n in $BATCHES; do batch_json "$n" "flag missing" >"$OUT/batch-$n.json"; done
    return
  fi
  # EOS ignored without min_new_tokens (which masks EOS in every row each step); an older binary has only that.
  if grep -q -- '--ignore-eos' <<<"$help"; then eos=(--ignore-eos); else eos=(--min-new-tokens "$BATCH_NEW"); fi
  local prev_n=0 prev_ms=0 n lft guess_s repeat rc
  for n in $BATCHES; do
    lft=$(left)
    guess_s=$(( prev_n > 0 ? (prev_ms * n / prev_n + 999) / 1000 : 60 ))
    if [ $((LOAD_S + 2 * guess_s)) -le "$lft" ]; then repeat=2
    elif [ $((LOAD_S + guess_s)) -le "$lft" ]; then repeat=1
    else
      echo "batch $n: skipped, ~$((LOAD_S + guess_s)) s needed and $lft s left of GPU_CHECK_BUDGET_S=$BUDGET"
      batch_json "$n" "skipped (time budget)" >"$OUT/batch-$n.json"; continue
    fi
    echo "--- batch $n (--repeat $repeat, timeout $lft s)"
    timeout "$lft" "$WORKER" generate --model "$MODEL" --prompt "$BATCH_PROMPT" --dtype "$DTYPE" --device "$DEV" \
      --strategy greedy --max-new-tokens "$BATCH_NEW" "${eos[@]}" --batch "$n" --repeat "$repeat" \
      --json >"$OUT/batch-$n.json" 2>"$OUT/batch-$n.err"
    rc=$?
    if [ "$rc" != 0 ]; then
      echo "FAIL: worker batch $n (exit $rc)"; tail -5 "$OUT/batch-$n.err"; fail=1
      batch_json "$n" "$([ "$rc" = 124 ] && echo "timed out after $lft s" || echo "failed, exit $rc")" >"$OUT/batch-$n.json"
      continue
    fi
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("text"); d.pop("token_ids"); print(json.dumps(d))' "$OUT/batch-$n.json"
    prev_n=$n
    prev_ms=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(int(int(sys.argv[2]) * int(sys.argv[3]) * 1000 / max(d["timings"]["tokens_per_s"], 1e-3)))' \
      "$OUT/batch-$n.json" "$n" "$BATCH_NEW")
  done
}
if has_part batch; then batch_part; else echo "batch: not asked (--parts)"; fi

# ---------------------------------------------------------------------------------------------------------
step "5. parity: transformers reference (logits, greedy and contrastive tokens/s, batched greedy ${HF_BATCHES// /, }, bandwidth), the worker against it, a split"
run_worker() { # name, extra args...
  local name="$1"; shift
  "$WORKER" generate --model "$MODEL" --prompt "$PROMPT" --dtype "$DTYPE" --json "$@" >"$OUT/$name.json" \
    2>"$OUT/$name.err" || { echo "FAIL: worker $name"; tail -5 "$OUT/$name.err"; fail=1; }
  cat "$OUT/$name.json"; echo
}
parity_part() {
  if [ "$(left)" -lt $((LOAD_S * 4)) ]; then echo "parity: skipped, $(left) s left of GPU_CHECK_BUDGET_S=$BUDGET"; return; fi
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  python3 scripts/gpu_check.py reference "$MODEL" "$PROMPT" "$OUT/ref.json" || { echo "FAIL: the transformers reference"; fail=1; return; }
  echo "--- worker logits parity"
  "$WORKER" score --model "$MODEL" --prompt "$PROMPT" --dtype "$DTYPE" --device "$DEV" --out "$OUT/worker.logits.npy" \
    && python3 scripts/gpu_check.py compare "$OUT/ref.json" "$OUT/worker.logits.npy" | tee "$OUT/parity.json" || fail=1
  echo "--- worker speed, batch 1, all on $DEV"
  run_worker greedy --device "$DEV" --repeat 2 --strategy greedy --max-new-tokens "$NEW" --min-new-tokens "$NEW"
  run_worker contrastive --device "$DEV" --repeat 2 --strategy contrastive --max-new-tokens "$NEW" --min-new-tokens "$NEW"
  echo "--- split: --device-map $SPLIT_MAP (the rest on the CPU); and --max-memory $SPLIT_BUDGET"
  run_worker split-map --device-map "$SPLIT_MAP" --strategy greedy --max-new-tokens "$SPLIT_NEW" --min-new-tokens "$SPLIT_NEW"
  run_worker split-budget --max-memory "$SPLIT_BUDGET" --strategy greedy --max-new-tokens "$SPLIT_NEW" --min-new-tokens "$SPLIT_NEW"
}
if has_part parity; then parity_part; else echo "parity: not asked (--parts)"; fi

step "6. summary"
python3 scripts/gpu_check.py summary "$OUT" "$NEW" "$SPLIT_NEW" "$BATCHES" "$BATCH_NEW" || fail=1
echo "gpu-check finished in ${SECONDS}s, fail=$fail"
exit $fail
