#!/usr/bin/env bash
# Benchmarks priority lanes in one worker (scripts/bench_lanes.py, AMQP straight to the worker): interactive
# latency on an idle worker against the same interactive jobs while a long batch-lane backlog runs, and the
# batch lane's tokens/s while interactive traffic pauses against the worker running only the batch, on the
# medium random GPT-J (8 × 1024), float32, all in one run. Prints a Markdown table of ratios.
#
#   scripts/bench-lanes.sh                                  # about 5 minutes a run on 2 cores
#   RUNS=3 scripts/bench-lanes.sh                           # three runs and their medians
#   INTERACTIVE_JOBS=5 WINDOW=8 scripts/bench-lanes.sh      # a quick check
#
# Knobs (environment): THREADS (2) libtorch threads; MAX_BATCH_SIZE (8); RESERVE (1, --interactive-reserve);
# BACKLOG (2000) batch jobs queued, BATCH_TOKENS (32) each; INTERACTIVE_JOBS (20), INTERACTIVE_TOKENS (16),
# GAP (1.0 s between interactive arrivals); WINDOW (32 batch completions a tokens/s figure is taken over);
# PAUSE (auto: the worker's --pause-batch-lane, which pauses batch-lane jobs while interactive ones run on a
# CPU; on or off to compare); RUNS (1); MODELS (target/bench-models, shared with bench-serve.sh); PROFILE (release, or debug);
# SKIP_BUILD=1. The backlog is not run to its end: the figures need it long, not finished; what is left is
# deleted with the run's namespace (queues and Redis keys). Redis and RabbitMQ keep running.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

THREADS="${THREADS:-2}"
MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-8}"
RESERVE="${RESERVE:-1}"
BACKLOG="${BACKLOG:-2000}"
BATCH_TOKENS="${BATCH_TOKENS:-32}"
INTERACTIVE_JOBS="${INTERACTIVE_JOBS:-20}"
INTERACTIVE_TOKENS="${INTERACTIVE_TOKENS:-16}"
GAP="${GAP:-1.0}"
WINDOW="${WINDOW:-32}"
RUNS="${RUNS:-1}"
PAUSE="${PAUSE:-auto}"
PROFILE="${PROFILE:-release}"
MODELS="${MODELS:-$ROOT/target/bench-models}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
NS="lanes$$"

COMMAND="THREADS=$THREADS MAX_BATCH_SIZE=$MAX_BATCH_SIZE RESERVE=$RESERVE BACKLOG=$BACKLOG"
COMMAND+=" BATCH_TOKENS=$BATCH_TOKENS INTERACTIVE_JOBS=$INTERACTIVE_JOBS INTERACTIVE_TOKENS=$INTERACTIVE_TOKENS"
COMMAND+=" GAP=$GAP WINDOW=$WINDOW PAUSE=$PAUSE RUNS=$RUNS PROFILE=$PROFILE scripts/bench-lanes.sh"

ensure_venv
ensure_services
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building the worker ($PROFILE)"
  if [ "$PROFILE" = release ]; then
    cargo build --release --locked -p worker
  else
    cargo build --locked -p worker
  fi
fi
mkdir -p "$MODELS"

cleanup() { delete_namespace "$NS" "$REDIS_URL"; }
trap cleanup EXIT

log "benchmarking lanes in namespace $NS (model in $MODELS/medium, logs in target/bench-lanes-logs)"
"$VENV/bin/python" scripts/bench_lanes.py \
  --worker "$ROOT/target/$PROFILE/worker" \
  --model "$MODELS/medium" \
  --threads "$THREADS" \
  --max-batch-size "$MAX_BATCH_SIZE" \
  --reserve "$RESERVE" \
  --pause "$PAUSE" \
  --backlog "$BACKLOG" \
  --batch-tokens "$BATCH_TOKENS" \
  --interactive-jobs "$INTERACTIVE_JOBS" \
  --interactive-tokens "$INTERACTIVE_TOKENS" \
  --gap "$GAP" \
  --window "$WINDOW" \
  --runs "$RUNS" \
  --namespace "$NS" \
  --amqp-url "$AMQP_URL" \
  --log-dir "$ROOT/target/bench-lanes-logs" \
  --command "$COMMAND"
