#!/usr/bin/env bash
# The whole service on this machine, in the foreground: Redis and RabbitMQ (started if not running), a
# release build, the gateway and WORKERS workers. Ctrl-C stops what this script started, workers first (each
# finishes the jobs in its batch, and the gateway, still up, records their results), then the gateway;
# Redis and RabbitMQ are left running. A second Ctrl-C kills at once (unfinished jobs go back to the queue).
#
#   scripts/up.sh                                  # tiny random GPT-J in ./models/tiny, one worker
#   WORKERS=3 scripts/up.sh                        # three workers sharing the jobs queue
#   MODEL_DIR=/srv/models/gpt-j-6b DTYPE=float16 DEVICE=cuda:0 scripts/up.sh
#
# The first run on a fresh machine takes a while: the virtualenv downloads torch (~5 GB) and the release
# build takes ~15 minutes on 2 cores; later runs reuse both and are ready in seconds.
#
# Settings come from the environment: LISTEN (default 127.0.0.1:8000), WORKERS (1), MODEL_DIR, NAMESPACE,
# AMQP_URL, REDIS_URL, and any other flag of `gateway --help` / `worker serve --help` by its variable.
# Logs go to LOG_DIR (default target/up-logs); worker i serves metrics on port METRICS_BASE_PORT + i
# (METRICS_BASE_PORT defaults to 9100).
# On Ctrl-C, workers get STOP_TIMEOUT_S (120) to finish the jobs in their batches.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

export LISTEN="${LISTEN:-127.0.0.1:8000}"
WORKERS="${WORKERS:-1}"
METRICS_BASE_PORT="${METRICS_BASE_PORT:-9100}"
LOG_DIR="${LOG_DIR:-$ROOT/target/up-logs}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
# How long a stopping worker may take to finish its job before it is killed (the job then returns to the
# queue, it is not lost).
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-120}"
# The gateway drains open requests for SHUTDOWN_GRACE_S (its flag's default, 30) when it stops.
GATEWAY_STOP_TIMEOUT_S="$((${SHUTDOWN_GRACE_S:-30} + 5))"
PORT="${LISTEN##*:}"
HOST="${LISTEN%:*}"
# A gateway listening on every interface is reached here on the loopback one.
case "$HOST" in 0.0.0.0 | "[::]" | "") HOST=127.0.0.1 ;; esac
BASE="http://$HOST:$PORT"
# This script's own requests (readiness, queue figures) carry the first key when keys are on.
AUTH=()
[ -z "${API_KEYS:-}" ] || AUTH=(-H "authorization: Bearer ${API_KEYS%%,*}")
METRICS=()
for i in $(seq "$WORKERS"); do METRICS+=("127.0.0.1:$((METRICS_BASE_PORT + i))"); done

# A port already taken (often by an up.sh still running) would end in "a process exited early"; say why now.
for port in "$PORT" "${METRICS[@]##*:}"; do
  if port_open "$port"; then
    echo "port $port is in use (another scripts/up.sh?); stop it, or set LISTEN / METRICS_BASE_PORT" >&2
    exit 1
  fi
done

ensure_venv
ensure_services
# The same build as scripts/worker.sh, so neither rebuilds after the other.
build_release
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
GATEWAY_PID=""
WORKER_PIDS=()

# shellcheck disable=SC2317 # run from the EXIT trap
# SIGTERM to PIDS, up to TIMEOUT_S for them to exit, then SIGKILL: stop_within TIMEOUT_S PID...
stop_within() {
  local timeout_s="$1" pid alive
  shift
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq $((timeout_s * 10))); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return
    sleep 0.1
  done
  log "still running after ${timeout_s} s: killing"
  kill -KILL "$@" 2>/dev/null || true
}

# shellcheck disable=SC2317 # run from the EXIT trap
# Jobs the job records say are running (empty when the gateway does not answer).
running_jobs() {
  { curl -fsS "${AUTH[@]}" "$BASE/v1/queue" 2>/dev/null || true; } | sed -n 's/.*"running":\([0-9]*\).*/\1/p'
}

# Workers first, while the gateway still consumes their replies: a job a stopping worker finishes is then
# recorded `succeeded`, not left `running` until a gateway comes back. Then the gateway.
# shellcheck disable=SC2317 # run from the EXIT trap
stop_all() {
  trap - EXIT
  trap 'log "interrupted again: killing"; kill -KILL ${GATEWAY_PID:+"$GATEWAY_PID"} "${WORKER_PIDS[@]}" 2>/dev/null; exit 130' INT TERM HUP
  if [ "${#WORKER_PIDS[@]}" -gt 0 ]; then
    log "stopping the workers (each finishes the jobs in its batch, up to ${STOP_TIMEOUT_S} s; Ctrl-C again kills)"
    stop_within "$STOP_TIMEOUT_S" "${WORKER_PIDS[@]}"
    if [ -n "$GATEWAY_PID" ] && kill -0 "$GATEWAY_PID" 2>/dev/null; then
      # The workers' last replies reach the gateway a moment after they exit.
      for _ in $(seq 50); do
        running="$(running_jobs)"
        [ -z "$running" ] || [ "$running" = 0 ] && break
        sleep 0.1
      done
    fi
  fi
  if [ -n "$GATEWAY_PID" ]; then
    log "stopping the gateway"
    stop_within "$GATEWAY_STOP_TIMEOUT_S" "$GATEWAY_PID"
  fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Each process in a session of its own (setsid): a Ctrl-C in the terminal reaches this script alone, which
# stops them in order, instead of reaching the gateway and the workers all at once.
log "starting the gateway on $LISTEN (log: $LOG_DIR/gateway.log)"
setsid "$BIN/gateway" >"$LOG_DIR/gateway.log" 2>&1 </dev/null &
GATEWAY_PID="$!"
for i in $(seq "$WORKERS"); do
  # Each worker's Prometheus metrics (batch size, KV cache, step time) on a port of its own.
  metrics="${METRICS[$((i - 1))]}"
  log "starting worker $i on $MODEL_DIR (log: $LOG_DIR/worker-$i.log, metrics: http://$metrics/metrics)"
  METRICS_LISTEN="$metrics" setsid "$BIN/worker" serve >"$LOG_DIR/worker-$i.log" 2>&1 </dev/null &
  WORKER_PIDS+=("$!")
done
PIDS=("$GATEWAY_PID" "${WORKER_PIDS[@]}")

exited_early() {
  local pid
  for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a process exited early; see $LOG_DIR" >&2
      tail -n 20 "$LOG_DIR"/*.log >&2
      return 0
    fi
  done
  return 1
}

# Ready: the gateway reaches Redis and RabbitMQ, and every worker has loaded its model and consumes jobs.
deadline=$((SECONDS + READY_TIMEOUT_S))
until curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "the gateway did not become ready; see $LOG_DIR/gateway.log" >&2; exit 1; }
  exited_early && exit 1
  sleep 0.2
done
until [ "$(curl -fsS "${AUTH[@]}" "$BASE/v1/queue" 2>/dev/null | sed -n 's/.*"consumers":\([0-9]*\).*/\1/p')" = "$WORKERS" ]; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "workers did not start consuming; see $LOG_DIR" >&2; exit 1; }
  exited_early && exit 1
  sleep 0.5
done

worker_metrics=""
for m in "${METRICS[@]}"; do worker_metrics+=" http://$m/metrics"; done
keys_note=""
[ -z "${API_KEYS:-}" ] || keys_note="
  # Keys are on (API_KEYS): add  -H 'authorization: Bearer KEY'  to every /v1 and /run request below.
"

cat <<EOF

Ready: gateway on $BASE (the playground: open $BASE/ in a browser), $WORKERS worker(s), model $MODEL_DIR.
Metrics: the gateway's at $BASE/metrics; worker(s):$worker_metrics.
$keys_note
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
  curl -s $BASE/v1/queue;  curl -s $BASE/metrics | head;  curl -s ${METRICS[0]}/metrics | grep ^worker_

AMQP producers: docs/amqp.md. Logs: $LOG_DIR.
Ctrl-C stops the workers (each finishes the jobs in its batch, up to ${STOP_TIMEOUT_S} s), then the gateway.
EOF

# Runs until Ctrl-C, or until one of the processes exits on its own (then the rest are stopped too).
set +e
wait -n "${PIDS[@]}"
status=$?
echo "a process exited (status $status); stopping the rest. Logs: $LOG_DIR" >&2
exit "$status"
