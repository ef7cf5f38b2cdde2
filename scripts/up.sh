#!/usr/bin/env bash
# The whole service on this machine, in the foreground: Redis and RabbitMQ (started if not running), a
# release build, the gateway and WORKERS workers. Ctrl-C stops what this script started (workers finish
# every job in their batches first); Redis and RabbitMQ are left running.
#
#   scripts/up.sh                                  # tiny random GPT-J in ./models/tiny, one worker
#   WORKERS=3 scripts/up.sh                        # three workers sharing the jobs queue
#   MODEL_DIR=/srv/models/gpt-j-6b DTYPE=float16 DEVICE=cuda:0 scripts/up.sh
#
# Settings come from the environment: LISTEN (default 127.0.0.1:8000), WORKERS (1), MODEL_DIR, NAMESPACE,
# AMQP_URL, REDIS_URL, and any other flag of `gateway --help` / `worker serve --help` by its variable.
# Logs go to LOG_DIR (default target/up-logs); worker i serves metrics on port METRICS_BASE_PORT + i (9100 + i).
# On Ctrl-C, workers get STOP_TIMEOUT_S (120) to finish the jobs in their batches.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

export LISTEN="${LISTEN:-127.0.0.1:8000}"
WORKERS="${WORKERS:-1}"
LOG_DIR="${LOG_DIR:-$ROOT/target/up-logs}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
# How long a stopping worker may take to finish its job before it is killed (the job then returns to the
# queue, it is not lost).
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-120}"
BASE="http://$LISTEN"

ensure_venv
ensure_services

log "building (release)"
cargo build --release --locked -p gateway -p worker
BIN="$ROOT/target/release"

if [ -z "${MODEL_DIR:-}" ]; then
  MODEL_DIR="$ROOT/models/tiny"
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    log "no MODEL_DIR given: writing a tiny random GPT-J to $MODEL_DIR"
    "$BIN/worker" init-tiny-model "$MODEL_DIR" --seed 0
  fi
fi
export MODEL_DIR

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {
  trap - INT TERM EXIT
  if [ "${#PIDS[@]}" -gt 0 ]; then
    log "stopping (workers finish the job in hand)"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    for _ in $(seq $((STOP_TIMEOUT_S * 10))); do
      alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.1
    done
    kill -KILL "${PIDS[@]}" 2>/dev/null || true
  fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting the gateway on $LISTEN (log: $LOG_DIR/gateway.log)"
"$BIN/gateway" >"$LOG_DIR/gateway.log" 2>&1 &
PIDS+=("$!")
for i in $(seq "$WORKERS"); do
  # Each worker's Prometheus metrics (batch size, KV cache, step time) on a port of its own.
  metrics="127.0.0.1:$((${METRICS_BASE_PORT:-9100} + i))"
  log "starting worker $i on $MODEL_DIR (log: $LOG_DIR/worker-$i.log, metrics: http://$metrics/metrics)"
  METRICS_LISTEN="$metrics" "$BIN/worker" serve >"$LOG_DIR/worker-$i.log" 2>&1 &
  PIDS+=("$!")
done

# Ready: the gateway reaches Redis and RabbitMQ, and every worker has loaded its model and consumes jobs.
deadline=$((SECONDS + READY_TIMEOUT_S))
until curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "the gateway did not become ready; see $LOG_DIR/gateway.log" >&2; exit 1; }
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a process exited early; see $LOG_DIR" >&2; tail -n 20 "$LOG_DIR"/*.log >&2; exit 1; }
  done
  sleep 0.2
done
until [ "$(curl -fsS "$BASE/v1/queue" 2>/dev/null | sed -n 's/.*"consumers":\([0-9]*\).*/\1/p')" = "$WORKERS" ]; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "workers did not start consuming; see $LOG_DIR" >&2; exit 1; }
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a process exited early; see $LOG_DIR" >&2; tail -n 20 "$LOG_DIR"/*.log >&2; exit 1; }
  done
  sleep 0.5
done

cat <<EOF

Ready: gateway on $BASE, $WORKERS worker(s), model $MODEL_DIR.

  # Submit a job, then poll it:
  id=\$(curl -s -X POST $BASE/v1/jobs -H 'content-type: application/json' \\
        -d '{"prompt": "Once upon a time", "parameters": {"max_new_tokens": 20}}' \\
        | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  curl -s $BASE/v1/jobs/\$id

  # The original synchronous endpoint:
  curl -s -X POST $BASE/run -H 'content-type: application/json' \\
       -d '{"data": "Once upon a time", "num_tokens": 20}'

  # Stream a job's tokens as Server-Sent Events (reconnect with Last-Event-ID to resume), cancel a job:
  curl -sN $BASE/v1/jobs/\$id/events
  curl -s -X DELETE $BASE/v1/jobs/\$id

  # The OpenAI-compatible API (also for the openai SDK: base_url=$BASE/v1):
  curl -sN $BASE/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "EleutherAI/gpt-j-6b", "messages": [{"role": "user", "content": "Hello"}], "stream": true}'

  # Queue and metrics (the gateway's, and worker 1's running batch); the API reference is at $BASE/docs
  # (the spec at $BASE/openapi.json):
  curl -s $BASE/v1/queue;  curl -s $BASE/metrics | head;  curl -s 127.0.0.1:9101/metrics | grep ^worker_

AMQP producers: docs/amqp.md. Logs: $LOG_DIR. Ctrl-C stops the gateway and the workers.
EOF

# Runs until Ctrl-C, or until one of the processes exits on its own (then the rest are stopped too).
set +e
wait -n "${PIDS[@]}"
status=$?
echo "a process exited (status $status); stopping the rest. Logs: $LOG_DIR" >&2
exit "$status"
