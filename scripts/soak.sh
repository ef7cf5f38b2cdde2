#!/usr/bin/env bash
# A soak under faults: 2 gateways and 3 workers on the tiny random GPT-J, JOBS jobs through HTTP
# (`POST /v1/jobs` + polls, `POST /run`) and AMQP (published straight to `{ns}.jobs`, replies on a durable
# queue of the soak's own), while a random worker is SIGKILLed every few seconds (and restarted), RabbitMQ is
# restarted once (`rabbitmqctl stop_app` / `start_app`) and one gateway is SIGKILLed and restarted once.
# A checker in the spirit of Jepsen's total-queue check then prints a table: jobs accepted, final states by
# kind, jobs lost (must be 0), jobs answered twice to a client (must be 0), jobs run twice by workers (counted
# and classified: the documented at-least-once case is a run cut off by its worker's death or its broker
# connection's loss, then redelivered), and the /run calls answered. Exits non-zero when a job was lost,
# answered twice (beyond the second identical AMQP reply docs/amqp.md documents; STRICT=1 counts that too)
# or run again without a documented cause, and on whatever else it cannot explain, each a row of the table:
# an HTTP status no documented case explains, a job record in its namespace it did not submit (foreign) or
# of a submission it was refused (a ghost), an accepted HTTP job without a record there, an AMQP reply to an
# id it never got accepted, a result that differs between the client's answer, the record, the event log
# and the streamed tokens, a panic in any gateway's or worker's log, a process that exited unasked.
# It refuses to start (exit 2, at once) when PORT or PORT+1 already answers, and takes a gateway as ready
# only when the socket listening on its port is that gateway's own. On any exit (SIGTERM, SIGINT and SIGHUP
# included) it stops every gateway and worker it started: soak.py stops them itself, and this script then
# ends whatever is left in soak.py's process group (there is something only if soak.py was SIGKILLed).
# What it checks and the full run's figures: docs/reliability.md.
#
#   scripts/soak.sh                     # the full soak: 1,000 jobs, about 2.5 minutes on 2 cores
#   SHORT=1 scripts/soak.sh             # the short one scripts/test.sh runs: 150 jobs, about 25 s
#   JOBS=3000 RATE=15 scripts/soak.sh   # longer
#
# Knobs (environment): JOBS (1000; SHORT: 150), RATE (jobs per second, 8; SHORT: 15), KILL_EVERY (mean
# seconds between worker SIGKILLs, 4; SHORT: one kill), BROKER_STOP_CMD / BROKER_START_CMD / BROKER_DOWN_S
# (the broker fault, `rabbitmqctl stop_app`, `start_app` 1 s later; scripts/cluster.sh stops a cluster's
# jobs-queue leader instead), BROKER_RESTART (1; 0 skips it, where RabbitMQ is
# shared with other test runs that a restart would disturb), GATEWAY_RESTART (1), SEED (0), STRICT=1 (a
# second final AMQP reply fails the run even in the documented case), PORT (the gateways take PORT and
# PORT+1, which must not answer yet; default: free ports), DRAIN_TIMEOUT, SKIP_BUILD=1 (use target/debug as
# it is), BIN_DIR (binaries to use instead of target/debug), JSON (also write the figures to this file),
# LOG_DIR (default target/soak-logs/NAMESPACE; logs of runs over an hour old are removed).
# Runs in a namespace of its own, deleted at the end (queues, exchange, Redis keys); the binaries are copied
# first, so a rebuild during the run changes nothing; RabbitMQ and Redis are left running.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

if [ -n "${SHORT:-}" ] && [ "${SHORT}" != 0 ]; then
  JOBS="${JOBS:-150}"
  RATE="${RATE:-15}"
  KILL_EVERY="${KILL_EVERY:-5}"
  MAX_KILLS="${MAX_KILLS:-1}"
  DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-60}"
  MODE=short
else
  JOBS="${JOBS:-1000}"
  RATE="${RATE:-8}"
  KILL_EVERY="${KILL_EVERY:-4}"
  MAX_KILLS="${MAX_KILLS:--1}"
  DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-180}"
  MODE=full
fi
BROKER_RESTART="${BROKER_RESTART:-1}"
GATEWAY_RESTART="${GATEWAY_RESTART:-1}"
SEED="${SEED:-0}"
PORT="${PORT:-0}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
NS="soak$$x$RANDOM"
LOG_DIR="${LOG_DIR:-$ROOT/target/soak-logs/$NS}"

# Two soaks on one port mix their jobs: refuse before the build, the copies and the model (soak.py checks
# again right before its gateways start).
if [ "$PORT" != 0 ]; then
  for port in "$PORT" "$((PORT + 1))"; do
    if port_open "$port"; then
      echo "soak: refusing to start: port $port already answers on 127.0.0.1 (another soak or service?);" \
        "the gateways take PORT and PORT+1: choose another PORT, or leave it out for free ports" >&2
      exit 2
    fi
  done
fi

COMMAND="JOBS=$JOBS RATE=$RATE KILL_EVERY=$KILL_EVERY MAX_KILLS=$MAX_KILLS BROKER_RESTART=$BROKER_RESTART"
COMMAND+=" GATEWAY_RESTART=$GATEWAY_RESTART SEED=$SEED scripts/soak.sh"

ensure_venv
ensure_services
if [ -z "${BIN_DIR:-}" ]; then
  BIN_DIR="$ROOT/target/debug"
  if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$BIN_DIR/gateway" ] || [ ! -x "$BIN_DIR/worker" ]; then
    log "building the gateway and the worker (debug)"
    cargo build --locked -p gateway -p worker --bins
  fi
fi

if [ "$BROKER_RESTART" != 0 ] && [ -z "${BROKER_STOP_CMD:-}" ] && ! rabbitmqctl status >/dev/null 2>&1; then
  log "WARNING: rabbitmqctl cannot reach the broker here (not installed, or not allowed); no broker restart"
  BROKER_RESTART=0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")"
SOAK_PID=""
# soak.py leads a process group that every gateway and worker joins; it stops them itself on any exit it
# sees. A SIGKILL it does not see: then its group still holds them, and this ends them.
end_soak_group() {
  if [ -n "$SOAK_PID" ] && kill -0 -- "-$SOAK_PID" 2>/dev/null; then
    log "processes of the soak left running (pid group $SOAK_PID): killing them"
    kill -KILL -- "-$SOAK_PID" 2>/dev/null || true
  fi
}
# SIGTERM, SIGINT, SIGHUP: passed on to soak.py, which stops its processes and exits; then this one exits
# too. (A foreground soak.py would delay the trap until it ended by itself: it runs in the background, and
# this script waits for it. A script started with `&` by another non-interactive shell starts with SIGINT
# ignored, which bash cannot trap: stop such a one with SIGTERM.)
stop_soak() {
  if [ -n "$SOAK_PID" ] && kill -0 "$SOAK_PID" 2>/dev/null; then
    log "$1: stopping the soak and every process it started"
    kill "-$1" "$SOAK_PID" 2>/dev/null || true
    wait "$SOAK_PID" 2>/dev/null || true
  fi
}
cleanup() {
  status=$?
  end_soak_group
  # Never leave the broker stopped, whatever happened to the run.
  if ! port_open 5672; then
    log "RabbitMQ is not answering: starting its application again"
    rabbitmqctl start_app >/dev/null 2>&1 || true
    ensure_rabbitmq || true
  fi
  # With the soak's own reply queue (the Python side deletes it too; this is for a run that died).
  AMQP_URL="$AMQP_URL" delete_namespace "$NS" "$REDIS_URL"
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'stop_soak INT; exit 130' INT
trap 'stop_soak TERM; exit 143' TERM
trap 'stop_soak HUP; exit 129' HUP

# Copies: another build may replace target/debug's binaries while the soak runs.
cp "$BIN_DIR/gateway" "$BIN_DIR/worker" "$WORK/"
"$WORK/worker" init-tiny-model "$WORK/tiny" --seed 0 >/dev/null
if [ -d "$ROOT/target/soak-logs" ]; then
  find "$ROOT/target/soak-logs" -mindepth 1 -maxdepth 1 -type d -mmin +60 -exec rm -rf {} + 2>/dev/null || true
fi
mkdir -p "$LOG_DIR"

extra=()
[ -n "${JSON:-}" ] && extra+=(--json "$JSON")
log "soak ($MODE) in namespace $NS: $JOBS jobs at $RATE/s (logs in $LOG_DIR)"
# In the background, waited for (see stop_soak): under `set -e` the wait's failure exits with soak.py's
# status, which the EXIT trap passes on.
"$VENV/bin/python" "$ROOT/scripts/soak.py" \
  --gateway "$WORK/gateway" \
  --worker "$WORK/worker" \
  --model "$WORK/tiny" \
  --namespace "$NS" \
  --port "$PORT" \
  --amqp-url "$AMQP_URL" \
  --redis-url "$REDIS_URL" \
  --log-dir "$LOG_DIR" \
  --jobs "$JOBS" \
  --rate "$RATE" \
  --kill-every "$KILL_EVERY" \
  --max-kills "$MAX_KILLS" \
  --broker-restart "$BROKER_RESTART" \
  --broker-stop-cmd "${BROKER_STOP_CMD:-rabbitmqctl stop_app}" \
  --broker-start-cmd "${BROKER_START_CMD:-rabbitmqctl start_app}" \
  --broker-down-s "${BROKER_DOWN_S:-1}" \
  --gateway-restart "$GATEWAY_RESTART" \
  --drain-timeout "$DRAIN_TIMEOUT" \
  --seed "$SEED" \
  --strict "${STRICT:-0}" \
  --command "$COMMAND" \
  "${extra[@]}" &
SOAK_PID=$!
wait "$SOAK_PID"
