#!/usr/bin/env bash
# The compose deployment end to end, on this machine's Docker engine: compose/docker-compose.yml's `cpu`
# profile as an operator runs it (the images of scripts/images.sh, the tiny GPT-J the tests use, which every
# worker-cpu writes with `worker init-tiny-model --seed 0`), checked for what the compose file and
# docs/deployment.md promise:
#   1. `up --wait`: RabbitMQ, Redis and the gateway healthy, a worker running;
#   2. a job through HTTP (POST /v1/jobs, then its record), and one through AMQP from the host: the pika
#      example of docs/amqp.md, run as written against the published AMQP port;
#   3. `--scale worker-cpu=3`: three consumers on the one jobs queue, and each of them runs jobs (published
#      over AMQP: the gateway's default submission limit is 10 a minute per client);
#   4. `down` and `up` again: a finished job's result is still there (Redis' append-only file, volume
#      redis-data), and a job that was queued when the stack went down runs after it is back (RabbitMQ's
#      quorum queue, volume rabbitmq-data);
#   5. the `monitoring` profile's Prometheus scrapes the gateway and every worker replica, and loaded the alert
#      rules.
# A compose project of its own (gptj-e2e-PID) on free loopback ports, so it runs beside anything else
# (scripts/up.sh, the tests' Redis and RabbitMQ); its containers, volumes and network are removed on exit.
# Without a Docker engine it says so and exits 0 (scripts/test.sh runs it when there is one).
#
#   scripts/compose-e2e.sh          # builds the images first (scripts/images.sh: seconds when they exist)
#   KEEP=1 scripts/compose-e2e.sh   # leave the stack running at the end (remove it with the printed command)
#   COMPOSE_E2E=0 scripts/test.sh   # skip it (on a fresh machine the images cost most of an hour, see
#                                   # docs/deployment.md, "Without a registry")
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

compose_run_or_skip "compose e2e"
command -v jq >/dev/null || apt_install jq
ensure_venv # pika, for the AMQP producer of docs/amqp.md

START_S=$SECONDS
scripts/images.sh

PROJECT="gptj-e2e-$$"
# Bound of each wait below; the tiny model answers a job in well under a second once a worker runs.
WAIT_S="${WAIT_S:-180}"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GATEWAY_PORT="$(free_port)"
AMQP_PORT="$(free_port)"
export GATEWAY_PUBLISH="127.0.0.1:$GATEWAY_PORT" AMQP_PUBLISH="127.0.0.1:$AMQP_PORT"
MANAGEMENT_PUBLISH="127.0.0.1:$(free_port)"
PROMETHEUS_PUBLISH="127.0.0.1:$(free_port)"
export MANAGEMENT_PUBLISH PROMETHEUS_PUBLISH
PROMETHEUS="http://$PROMETHEUS_PUBLISH"
BASE="http://$GATEWAY_PUBLISH"
AMQP_URL="amqp://gptj:gptj@127.0.0.1:$AMQP_PORT/%2f"
NAMESPACE=gptj

COMPOSE_FILES=(-f compose/docker-compose.yml)
ENGINE="$(docker version -f '{{.Server.Version}}')"
if [ "${ENGINE%%.*}" -lt 25 ]; then
  log "Docker Engine $ENGINE: with compose/engine-before-25.yml (no healthcheck start_interval)"
  COMPOSE_FILES+=(-f compose/engine-before-25.yml)
fi
compose() { docker compose "${COMPOSE_FILES[@]}" -p "$PROJECT" --profile cpu "$@"; }
# The monitoring profile names Grafana too, whose image is not made here: its commands name prometheus.
compose_monitoring() { compose --profile monitoring "$@"; }

trap 'compose_teardown "compose e2e" compose_monitoring "docker compose ${COMPOSE_FILES[*]} -p $PROJECT --profile cpu --profile monitoring"' EXIT

check() { log "compose e2e: $*"; }
fail() { echo "compose e2e: FAILED: $*" >&2; exit 1; }

# POST /v1/jobs with PROMPT; prints the job id.
submit() {
  local body
  body="$(jq -nc --arg prompt "$1" '{prompt: $prompt, parameters: {max_new_tokens: 8, strategy: "greedy"}}')"
  curl -fsS -X POST "$BASE/v1/jobs" -H 'content-type: application/json' -d "$body" | jq -er .id
}

# Waits until job ID reaches a final status within WAIT_S; prints its record. Fails unless `succeeded`.
await_job() {
  local record status
  for _ in $(seq $((WAIT_S * 4))); do
    record="$(curl -fsS "$BASE/v1/jobs/$1")" || fail "GET /v1/jobs/$1"
    status="$(jq -r .status <<<"$record")"
    case "$status" in
      succeeded) echo "$record"; return ;;
      queued | running) sleep 0.25 ;;
      *) fail "job $1 ended $status: $record" ;;
    esac
  done
  fail "job $1 still $status after ${WAIT_S} s"
}

# Consumers of the jobs queue, as the broker counts them.
consumers() {
  compose exec -T rabbitmq rabbitmqctl -q list_queues name consumers \
    | awk -v q="$NAMESPACE.jobs" '$1 == q { print $2 }'
}

await_consumers() {
  for _ in $(seq "$WAIT_S"); do
    [ "$(consumers)" = "$1" ] && return
    sleep 1
  done
  fail "the jobs queue has $(consumers) consumers, not $1, after ${WAIT_S} s"
}

# 1. Up.
check "docker compose --profile cpu up --wait (project $PROJECT, gateway on $GATEWAY_PUBLISH)"
UP_S=$SECONDS
compose up -d --wait --wait-timeout "$WAIT_S"
for service in rabbitmq redis gateway; do
  health="$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$service")")"
  [ "$health" = healthy ] || fail "$service is $health"
done
await_consumers 1
log "up in $((SECONDS - UP_S)) s"

# 2. A job through HTTP, and one through AMQP from the host.
check "a job through HTTP"
ID="$(submit "The quick brown fox")"
RECORD="$(await_job "$ID")"
jq -e '.result.new_tokens > 0 and (.worker_id | length > 0)' <<<"$RECORD" >/dev/null \
  || fail "job $ID has no result: $RECORD"
FIRST_ID="$ID"
FIRST_TEXT="$(jq -r .result.text <<<"$RECORD")"

check "a job through AMQP from the host: docs/amqp.md's pika example, as written"
EXAMPLE="$(mktemp --suffix=.py)"
awk '/^## Python \(pika\)/ { on = 1 } on && /^```python/ { code = 1; next } code && /^```/ { exit } code' \
  docs/amqp.md >"$EXAMPLE"
OUTPUT="$(AMQP_URL="$AMQP_URL" NAMESPACE="$NAMESPACE" \
  timeout "$WAIT_S" "$VENV/bin/python" "$EXAMPLE" "Once upon a time")" || fail "the AMQP example: $OUTPUT"
rm -f "$EXAMPLE"
if ! grep -q '^started on ' <<<"$OUTPUT" || ! grep -q ' tokens, ' <<<"$OUTPUT"; then
  fail "the AMQP example printed: $OUTPUT"
fi

# 3. Three workers on one queue.
check "--scale worker-cpu=3: three consumers of $NAMESPACE.jobs, each runs jobs"
compose up -d --wait --wait-timeout "$WAIT_S" --scale worker-cpu=3 --no-recreate
await_consumers 3
WORKERS="$(compose ps -q worker-cpu | wc -l)"
[ "$WORKERS" = 3 ] || fail "$WORKERS worker-cpu containers, not 3"
# Jobs in rounds until every replica has run one, published over AMQP (the gateway's submission limit, 10 a
# minute per client by default, would make this slow, not different): the broker hands each consumer up to
# CPU_MAX_BATCH_SIZE at a time, so one round may go to fewer than three; rounds repeat, bounded.
# amqp_round N: publishes N jobs (docs/amqp.md's contract), prints the worker_id of each one's success.
amqp_round() {
  AMQP_URL="$AMQP_URL" NAMESPACE="$NAMESPACE" JOBS="$1" WAIT_S="$WAIT_S" "$VENV/bin/python" - <<'PY'
import json, os, time, uuid

import pika

connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
channel = connection.channel()
channel.confirm_delivery()
reply_to = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
pending = set()
for i in range(int(os.environ["JOBS"])):
    job_id = str(uuid.uuid4())
    body = {"version": 1, "prompt": f"job {i}", "parameters": {"max_new_tokens": 8, "strategy": "greedy"}}
    channel.basic_publish(
        exchange="",
        routing_key=f"{os.environ['NAMESPACE']}.jobs",
        body=json.dumps(body).encode(),
        properties=pika.BasicProperties(
            correlation_id=job_id, message_id=job_id, reply_to=reply_to,
            content_type="application/json", delivery_mode=2,
        ),
        mandatory=True,
    )
    pending.add(job_id)
deadline = time.monotonic() + float(os.environ["WAIT_S"])
for method, props, payload in channel.consume(reply_to, auto_ack=True, inactivity_timeout=1):
    if time.monotonic() > deadline:
        raise SystemExit(f"{len(pending)} jobs unanswered")
    if method is None or props.correlation_id not in pending:
        continue
    if props.type == "job.failed":
        raise SystemExit(f"job {props.correlation_id} failed: {payload.decode()}")
    if props.type == "job.succeeded":
        pending.discard(props.correlation_id)
        print(json.loads(payload)["worker_id"])
        if not pending:
            break
connection.close()
PY
}
declare -A RAN_ON=()
for _ in $(seq 10); do
  WORKER_IDS="$(amqp_round 24)" || fail "a round of AMQP jobs: $WORKER_IDS"
  while read -r worker; do
    RAN_ON["${worker%-*}"]=1 # HOSTNAME-PID: the container's hostname names the replica
  done <<<"$WORKER_IDS"
  [ "${#RAN_ON[@]}" -ge 3 ] && break
done
[ "${#RAN_ON[@]}" = 3 ] || fail "jobs ran on ${#RAN_ON[@]} replicas (${!RAN_ON[*]}), not 3"
log "jobs ran on the 3 replicas: ${!RAN_ON[*]}"

# 5. Prometheus (before the restart, while three replicas run).
check "the monitoring profile's Prometheus scrapes the gateway and the 3 workers"
compose_monitoring up -d --wait --wait-timeout "$WAIT_S" --no-deps prometheus
UP_TARGETS=""
for _ in $(seq "$WAIT_S"); do
  UP_TARGETS="$(curl -fsS "$PROMETHEUS/api/v1/targets?state=active" \
    | jq -r '[.data.activeTargets[] | select(.health == "up") | .labels.job] | group_by(.) | map("\(.[0])=\(length)") | join(" ")')" || true
  [[ " $UP_TARGETS " == *" gateway=1 "* && " $UP_TARGETS " == *" worker=3 "* ]] && break
  sleep 1
done
[[ " $UP_TARGETS " == *" gateway=1 "* && " $UP_TARGETS " == *" worker=3 "* ]] \
  || fail "Prometheus targets up: $UP_TARGETS (want gateway=1 worker=3)"
curl -fsS "$PROMETHEUS/api/v1/query" --data-urlencode 'query=count(up{job="worker"} == 1)' \
  | jq -e '.data.result[0].value[1] == "3"' >/dev/null || fail "up{job=\"worker\"} is not 1 for 3 workers"
RULES="$(curl -fsS "$PROMETHEUS/api/v1/rules" | jq '[.data.groups[].rules[]] | length')"
[ "$RULES" -gt 0 ] || fail "Prometheus loaded no rules of compose/monitoring/alerts.yml"
log "Prometheus targets up: $UP_TARGETS; $RULES alerting rules loaded"

# 4. Down and up again: results and queued jobs survive.
check "down and up: a finished result (Redis AOF) and a queued job (RabbitMQ volume) survive"
compose stop worker-cpu >/dev/null
await_consumers 0
QUEUED_ID="$(submit "queued across a restart")"
sleep 1
[ "$(curl -fsS "$BASE/v1/jobs/$QUEUED_ID" | jq -r .status)" = queued ] || fail "job $QUEUED_ID is not queued"
compose_monitoring down --timeout 60
[ -z "$(compose_monitoring ps -aq)" ] || fail "containers left after down"
compose up -d --wait --wait-timeout "$WAIT_S"
RECORD="$(await_job "$FIRST_ID")"
[ "$(jq -r .result.text <<<"$RECORD")" = "$FIRST_TEXT" ] || fail "job $FIRST_ID's result changed: $RECORD"
await_job "$QUEUED_ID" >/dev/null
log "after down/up: job $FIRST_ID kept its result, queued job $QUEUED_ID ran"

log "compose e2e passed in $((SECONDS - START_S)) s (images included)"
