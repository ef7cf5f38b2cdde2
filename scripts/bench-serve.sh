#!/usr/bin/env bash
# Benchmarks continuous batching in one worker, through the whole service (gateway, Redis, RabbitMQ),
# against the same worker one job at a time (--max-batch-size 1) and against transformers' batched
# `generate`, on the medium random GPT-J (8 × 1024), float32, in one run; and the cost of token streaming
# (the greedy row again with --stream-tokens 0). Prints a Markdown report.
#
#   scripts/bench-serve.sh                              # about 12 minutes on 2 cores
#   JOBS=4 TOKENS=8 MIXED_JOBS=8 scripts/bench-serve.sh  # a quick check
#   JSON=target/bench-serve.json scripts/bench-serve.sh # also write the numbers as JSON
#
# Knobs (environment): THREADS (2) libtorch threads for the worker and transformers; JOBS (16) concurrent
# jobs and TOKENS (32) new tokens each in the greedy and contrastive rows, CONTRASTIVE_TOKENS (TOKENS);
# MIXED_JOBS (64), MIXED_RATE (2, mean Poisson arrivals per second), MIXED_MIN_TOKENS (8), MIXED_MAX_TOKENS
# (128) for the mixed row; MAX_BATCH_SIZE (16) of the continuous worker; SEED (0); SKIP (greedy,
# contrastive, mixed, stream: phases to leave out); SKIP_TRANSFORMERS=1; WORKER_ARGS (extra `worker serve` flags);
# MODELS (target/bench-models, shared with bench-worker.sh); PORT (18090); SKIP_BUILD=1; JSON (a file).
# Runs in a namespace of its own (queues and Redis keys), deleted at the end; Redis and RabbitMQ keep running.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

THREADS="${THREADS:-2}"
JOBS="${JOBS:-16}"
TOKENS="${TOKENS:-32}"
CONTRASTIVE_TOKENS="${CONTRASTIVE_TOKENS:-$TOKENS}"
MIXED_JOBS="${MIXED_JOBS:-64}"
MIXED_RATE="${MIXED_RATE:-2}"
MIXED_MIN_TOKENS="${MIXED_MIN_TOKENS:-8}"
MIXED_MAX_TOKENS="${MIXED_MAX_TOKENS:-128}"
MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-16}"
SEED="${SEED:-0}"
PORT="${PORT:-18090}"
MODELS="${MODELS:-$ROOT/target/bench-models}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
NS="bench$$"

# The exact command, knobs included, for the report.
COMMAND="THREADS=$THREADS JOBS=$JOBS TOKENS=$TOKENS CONTRASTIVE_TOKENS=$CONTRASTIVE_TOKENS"
COMMAND+=" MIXED_JOBS=$MIXED_JOBS MIXED_RATE=$MIXED_RATE MIXED_MIN_TOKENS=$MIXED_MIN_TOKENS"
COMMAND+=" MIXED_MAX_TOKENS=$MIXED_MAX_TOKENS MAX_BATCH_SIZE=$MAX_BATCH_SIZE SEED=$SEED"
[ -n "${SKIP:-}" ] && COMMAND+=" SKIP=$SKIP"
[ -n "${SKIP_TRANSFORMERS:-}" ] && COMMAND+=" SKIP_TRANSFORMERS=1"
[ -n "${WORKER_ARGS:-}" ] && COMMAND+=" WORKER_ARGS='$WORKER_ARGS'"
COMMAND+=" scripts/bench-serve.sh"

ensure_venv
ensure_services
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building the worker and the gateway (release)"
  cargo build --release --locked -p worker -p gateway
fi
mkdir -p "$MODELS"

cleanup() { delete_namespace "$NS" "$REDIS_URL"; }
trap cleanup EXIT

extra=()
[ -n "${SKIP_TRANSFORMERS:-}" ] && extra+=(--skip-transformers)
[ -n "${JSON:-}" ] && extra+=(--json "$JSON")

log "benchmarking in namespace $NS (model in $MODELS/medium, logs in target/bench-serve-logs)"
"$VENV/bin/python" scripts/bench_serve.py \
  --worker "$ROOT/target/release/worker" \
  --gateway "$ROOT/target/release/gateway" \
  --model "$MODELS/medium" \
  --threads "$THREADS" \
  --jobs "$JOBS" \
  --tokens "$TOKENS" \
  --contrastive-tokens "$CONTRASTIVE_TOKENS" \
  --mixed-jobs "$MIXED_JOBS" \
  --mixed-rate "$MIXED_RATE" \
  --mixed-min-tokens "$MIXED_MIN_TOKENS" \
  --mixed-max-tokens "$MIXED_MAX_TOKENS" \
  --max-batch-size "$MAX_BATCH_SIZE" \
  --seed "$SEED" \
  --namespace "$NS" \
  --port "$PORT" \
  --amqp-url "$AMQP_URL" \
  --redis-url "$REDIS_URL" \
  --worker-args="${WORKER_ARGS:-}" \
  --skip="${SKIP:-}" \
  --log-dir "$ROOT/target/bench-serve-logs" \
  --command "$COMMAND" \
  "${extra[@]}"
