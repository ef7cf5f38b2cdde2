#!/usr/bin/env bash
# Faults across containers, in the spirit of Jepsen: the compose deployment (compose/docker-compose.yml's
# `cpu` profile with compose/faults.yml: 2 gateways, 3 CPU workers on the tiny GPT-J, Redis, a three-node
# RabbitMQ cluster) under the soak's load and checker (scripts/soak.py: jobs through HTTP `POST /v1/jobs`,
# `POST /run` and AMQP; then 0 lost, 0 answered twice, every second run explained, nothing unexplained),
# while scripts/compose_faults.py breaks it, one fault at a time, worker kills all along:
#   - a worker container killed (`docker kill`) mid-batch, then started again, every KILL_EVERY s;
#   - a worker frozen (`docker pause`) for PAUSE_S, longer than its AMQP heartbeats allow;
#   - the RabbitMQ node leading the jobs queue stopped (`docker compose stop`) for BROKER_DOWN_S;
#   - a worker cut from the brokers, and a gateway cut from Redis (`docker network disconnect`), CUT_S each;
#   - Redis restarted empty (its container and volume removed, an empty one started).
# Prints the checker's table and exits non-zero when a check failed. Its own compose project on free
# loopback ports, removed at the end with its volumes (KEEP=1 leaves it). Without a Docker engine it says so
# and exits 0. The figures of a full run: docs/reliability.md, "Faults across containers".
#
#   scripts/compose-faults.sh            # the full run: 600 jobs, about 6 minutes once the images exist
#   SHORT=1 scripts/compose-faults.sh    # the short one scripts/test.sh runs: 200 jobs, every fault, shorter
#
# Knobs (environment): JOBS, RATE (jobs per second), KILL_EVERY, PAUSE_S, CUT_S, BROKER_DOWN_S, SEED,
# DRAIN_TIMEOUT, JSON (also write the figures there), LOG_DIR (default target/compose-faults-logs/PROJECT),
# SKIP_IMAGES=1 (the images exist: scripts/test.sh has just built them), COMPOSE_E2E=0 (skip, as
# scripts/compose-e2e.sh does).
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

compose_run_or_skip "compose faults"
if [ -n "${SHORT:-}" ] && [ "${SHORT}" != 0 ]; then
  JOBS="${JOBS:-200}"
  RATE="${RATE:-4}"
  KILL_EVERY="${KILL_EVERY:-15}"
  PAUSE_S="${PAUSE_S:-35}"
  CUT_S="${CUT_S:-8}"
  BROKER_DOWN_S="${BROKER_DOWN_S:-8}"
  MODE=short
else
  JOBS="${JOBS:-600}"
  RATE="${RATE:-4}"
  KILL_EVERY="${KILL_EVERY:-12}"
  PAUSE_S="${PAUSE_S:-35}"
  CUT_S="${CUT_S:-20}"
  BROKER_DOWN_S="${BROKER_DOWN_S:-15}"
  MODE=full
fi
SEED="${SEED:-0}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-240}"
ensure_venv # pika, for the soak's AMQP client
[ -n "${SKIP_IMAGES:-}" ] || scripts/images.sh

PROJECT="gptj-faults-$$"
LOG_DIR="${LOG_DIR:-$ROOT/target/compose-faults-logs/$PROJECT}"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Two gateways: a range of two free ports (the first of two adjacent ones that are both free).
while :; do
  G="$(free_port)"
  port_open "$((G + 1))" || break
done
A1="$(free_port)" A2="$(free_port)" A3="$(free_port)" R="$(free_port)" M="$(free_port)"
export GATEWAY_PUBLISH="127.0.0.1:$G-$((G + 1))" AMQP_PUBLISH="127.0.0.1:$A1" AMQP_PUBLISH_2="127.0.0.1:$A2"
export AMQP_PUBLISH_3="127.0.0.1:$A3" REDIS_PUBLISH="127.0.0.1:$R" MANAGEMENT_PUBLISH="127.0.0.1:$M"
export CPU_THREADS=1 CPU_MAX_BATCH_SIZE=8

COMPOSE_FILES=(-f compose/docker-compose.yml -f compose/faults.yml)
EXTRA=()
ENGINE="$(docker version -f '{{.Server.Version}}')"
if [ "${ENGINE%%.*}" -lt 25 ]; then
  COMPOSE_FILES+=(-f compose/engine-before-25.yml)
  EXTRA=(--extra-file compose/engine-before-25.yml)
fi
compose() { docker compose "${COMPOSE_FILES[@]}" -p "$PROJECT" --profile cpu "$@"; }

trap 'compose_teardown "compose faults" compose "docker compose ${COMPOSE_FILES[*]} -p $PROJECT --profile cpu"' EXIT

log "compose faults ($MODE): project $PROJECT, gateways on 127.0.0.1:$G-$((G + 1)), up with 2 gateways and 3 workers"
UP_S=$SECONDS
compose up -d --wait --wait-timeout 300 --scale gateway=2 --scale worker-cpu=3
log "up in $((SECONDS - UP_S)) s"

COMMAND="SHORT=${SHORT:-0} JOBS=$JOBS RATE=$RATE KILL_EVERY=$KILL_EVERY PAUSE_S=$PAUSE_S CUT_S=$CUT_S"
COMMAND+=" BROKER_DOWN_S=$BROKER_DOWN_S SEED=$SEED scripts/compose-faults.sh"
URLS="amqp://gptj:gptj@127.0.0.1:$A1/%2f,amqp://gptj:gptj@127.0.0.1:$A2/%2f,amqp://gptj:gptj@127.0.0.1:$A3/%2f"
"$VENV/bin/python" scripts/compose_faults.py \
  --project "$PROJECT" "${EXTRA[@]}" \
  --amqp-url "$URLS" \
  --redis-url "redis://127.0.0.1:$R/" \
  --log-dir "$LOG_DIR" \
  --jobs "$JOBS" --rate "$RATE" \
  --kill-every "$KILL_EVERY" --pause-s "$PAUSE_S" --cut-s "$CUT_S" --broker-down-s "$BROKER_DOWN_S" \
  --drain-timeout "$DRAIN_TIMEOUT" --seed "$SEED" \
  --command "$COMMAND" ${JSON:+--json "$JSON"}
