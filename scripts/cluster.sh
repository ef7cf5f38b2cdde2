#!/usr/bin/env bash
# Beyond one broker: starts a three-node RabbitMQ cluster on this machine (nodes gptj-c1..3@localhost,
# AMQP ports CLUSTER_PORT..+2, distribution ports 25701..3, data in a temporary folder), runs the soak
# (scripts/soak.sh: 2 gateways, 3 workers, jobs through HTTP and AMQP, workers SIGKILLed at random, a gateway
# restarted) with every process given all three URLs, and in the middle of it stops the node that leads the
# jobs queue (`rabbitmqctl stop_app` on it), then starts it again. The soak's checker then says whether a
# job was lost or answered twice. The cluster is stopped and its data deleted at the end; the machine's own
# RabbitMQ (port 5672) is not touched.
#
#   scripts/cluster.sh                  # 1,000 jobs
#   JOBS=300 scripts/cluster.sh         # shorter
#   ALARM_ONLY=1 scripts/cluster.sh     # only the memory-alarm check (below), about 30 s
#
# The figures of a run are in docs/reliability.md.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

CLUSTER_PORT="${CLUSTER_PORT:-5701}"
NODES=(gptj-c1@localhost gptj-c2@localhost gptj-c3@localhost)

ensure_venv
ensure_services
command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
# Built once, as scripts/soak.sh builds (SKIP_BUILD=1: use target/debug as it is; BIN_DIR: binaries to use
# instead): the alarm check uses them, and so does the soak, told SKIP_BUILD=1.
if [ -z "${BIN_DIR:-}" ]; then
  BIN_DIR="$ROOT/target/debug"
  if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$BIN_DIR/gateway" ] || [ ! -x "$BIN_DIR/worker" ]; then
    log "building the gateway and the worker (debug)"
    cargo build --locked -p gateway -p worker --bins
  fi
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rabbit-cluster.XXXXXX")"
chmod 755 "$WORK"

node_port() { echo $((CLUSTER_PORT + $1)); }

start_node() {
  local i=$1 node=${NODES[$1]} dir="$WORK/n$1"
  mkdir -p "$dir"
  echo "listeners.tcp.local = 127.0.0.1:$(node_port "$i")" >"$dir/rabbitmq.conf"
  : >"$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$dir" 2>/dev/null || true
  RABBITMQ_NODENAME="$node" RABBITMQ_DIST_PORT=$((25701 + i)) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
    rabbitmq-server -detached
  rabbitmqctl -q -n "$node" wait "$dir/pid" --timeout 120 >/dev/null
}

cleanup() {
  status=$?
  for node in "${NODES[@]}"; do
    rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

log "starting three RabbitMQ nodes on ports $(node_port 0)-$(node_port 2)"
for i in 0 1 2; do start_node "$i"; done
for i in 1 2; do
  for step in stop_app reset "join_cluster ${NODES[0]}" start_app; do
    # shellcheck disable=SC2086 # the step is a command and its argument
    rabbitmqctl -q -n "${NODES[$i]}" $step >>"$WORK/join.log" 2>&1
  done
done
running=$(rabbitmqctl -q -n "${NODES[0]}" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null)
[ "$running" = 3 ] || { log "the cluster has ${running:-no} running nodes, not 3: $(tail -5 "$WORK/join.log")"; exit 1; }
log "cluster of 3 running"

URLS=""
for i in 0 1 2; do URLS+="${URLS:+,}amqp://guest:guest@127.0.0.1:$(node_port "$i")/%2f"; done

# A memory alarm, on brokers of our own: it blocks publishing connections cluster-wide. While it lasts a
# gateway must say so on /readyz, refuse submissions at once (503 with Retry-After) and keep none of them (a
# kept job would run behind its client's back once the alarm clears, and again on the client's retry), and
# still answer /v1/queue quickly; once it clears, submissions pass again.
alarm_check() {
  local port=$((CLUSTER_PORT + 100)) ns="alarm$$" gw_pid ready="" before after verdict
  cp "$BIN_DIR/gateway" "$WORK/gateway"
  RUST_LOG=warn "$WORK/gateway" --listen "127.0.0.1:$port" --namespace "$ns" --amqp-url "$URLS" \
    --publish-timeout-ms 1000 --submit-rate-limit 1000/60s >"$WORK/alarm-gateway.log" 2>&1 &
  gw_pid=$!
  for _ in $(seq 100); do
    curl -fsS "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  # A job before the alarm: the broker tells a connection of an alarm once it has published.
  before=$(curl -s -o /dev/null -w '%{http_code}' -X POST "127.0.0.1:$port/v1/jobs" \
    -H 'content-type: application/json' -d '{"prompt": "before the alarm", "parameters": {"max_new_tokens": 2}}')
  log "alarm: memory high watermark set to nothing on ${NODES[0]}"
  rabbitmqctl -q -n "${NODES[0]}" set_vm_memory_high_watermark absolute 1 >/dev/null
  for _ in $(seq 100); do
    ready=$(curl -s "127.0.0.1:$port/readyz")
    [[ "$ready" == *'"rabbitmq_blocked":true'* ]] && break
    sleep 0.2
  done
  # Twenty submissions and twenty queue reads at once, during the alarm.
  local during=0
  verdict=$("$VENV/bin/python" - "127.0.0.1:$port" <<'PY'
import concurrent.futures, json, sys, time, urllib.error, urllib.request
base = "http://" + sys.argv[1]
def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("retry-after"), time.monotonic() - start
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("retry-after"), time.monotonic() - start
body = {"prompt": "during the alarm", "parameters": {"max_new_tokens": 2}}
with concurrent.futures.ThreadPoolExecutor(40) as pool:
    submits = [pool.submit(call, "POST", "/v1/jobs", body) for _ in range(20)]
    queues = [pool.submit(call, "GET", "/v1/queue") for _ in range(20)]
    submits = [f.result() for f in submits]
    queues = [f.result() for f in queues]
refused = all(s == 503 and ra for s, ra, _ in submits)
answered = all(s == 200 for s, _, _ in queues)
slowest = max(t for _, _, t in submits + queues)
print(f"submissions {sorted({s for s, _, _ in submits})} with Retry-After: {refused}; "
      f"queue reads {sorted({s for s, _, _ in queues})}; slowest answer {slowest:.2f} s")
sys.exit(0 if refused and answered and slowest < 3 else 1)
PY
  ) || during=$?
  rabbitmqctl -q -n "${NODES[0]}" set_vm_memory_high_watermark 0.4 >/dev/null
  local cleared=""
  for _ in $(seq 100); do
    cleared=$(curl -s "127.0.0.1:$port/readyz")
    [[ "$cleared" == *'"ready":true'* ]] && break
    sleep 0.2
  done
  after=$(curl -s -o /dev/null -w '%{http_code}' -X POST "127.0.0.1:$port/v1/jobs" \
    -H 'content-type: application/json' -d '{"prompt": "after the alarm", "parameters": {"max_new_tokens": 2}}')
  # Past the outbox's first-publish grace (the publish timeout + 2 s), anything kept would have been
  # republished: the queue must hold the job before the alarm and the one after, and nothing else.
  sleep 4
  local depth
  depth=$(curl -s "127.0.0.1:$port/v1/queue" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["depth"])') \
    || depth="unreadable"
  kill "$gw_pid" 2>/dev/null
  wait "$gw_pid" 2>/dev/null
  printf '%-58s %s\n' "submission before the alarm" "$before" \
    "/readyz during the alarm" "$ready" \
    "during the alarm" "$verdict" \
    "/readyz after" "$cleared" \
    "submission after the alarm" "$after" \
    "jobs queued in the end (2 expected: before and after)" "$depth"
  AMQP_URL="$URLS" delete_namespace "$ns"
  [ "$before" = 202 ] && [[ "$ready" == *'"rabbitmq_blocked":true'* ]] && [ "$during" = 0 ] \
    && [[ "$cleared" == *'"ready":true'* ]] && [ "$after" = 202 ] && [ "$depth" = 2 ]
}

# The fault: stop whichever node leads the jobs queue now (asked of any node that answers), and later start
# it again. The soak runs these in place of its single-broker restart.
cat >"$WORK/stop-leader" <<EOF
#!/usr/bin/env bash
for node in ${NODES[*]}; do
  leader=\$(rabbitmqctl -q -n "\$node" list_queues name leader 2>/dev/null | awk '\$1 ~ /\\.jobs\$/ { print \$2; exit }')
  [ -n "\$leader" ] && break
done
echo "\$leader" >"$WORK/stopped"
echo "stopping \$leader, the leader of the jobs queue" >&2
rabbitmqctl -q -n "\$leader" stop_app
EOF
cat >"$WORK/start-stopped" <<EOF
#!/usr/bin/env bash
rabbitmqctl -q -n "\$(cat "$WORK/stopped")" start_app
EOF
chmod +x "$WORK/stop-leader" "$WORK/start-stopped"

log "a memory alarm on the cluster"
if ! alarm_check; then
  log "the gateway did not ride out a memory alarm: $(tail -5 "$WORK/alarm-gateway.log")"
  exit 1
fi

[ -n "${ALARM_ONLY:-}" ] && exit 0

log "soak against the cluster: ${URLS//guest:guest@/}"
set +e
AMQP_URL="$URLS" BROKER_STOP_CMD="$WORK/stop-leader" BROKER_START_CMD="$WORK/start-stopped" \
  BROKER_DOWN_S="${BROKER_DOWN_S:-10}" SKIP_BUILD=1 "$ROOT/scripts/soak.sh"
status=$?
set -e
log "the node stopped mid-soak, the jobs queue's leader then: $(cat "$WORK/stopped" 2>/dev/null || echo none)"
exit "$status"
