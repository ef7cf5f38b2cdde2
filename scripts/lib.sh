# Shared setup for every script: sourced, not run. Makes a fresh machine usable: the Python virtualenv with
# libtorch and transformers, the environment tch needs, and the Redis and RabbitMQ servers.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The virtualenv holds torch (whose libtorch tch links) and transformers (the parity reference).
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, transformers, safetensors, openai, pika, playwright, langchain_openai, lm_eval, moto.server' 2>/dev/null; then
    log "setting up the Python virtualenv in $VENV (torch 2.11, transformers 4.55.4, openai, langchain-openai, lm-eval, pika, playwright; the first time downloads ~5 GB)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements.txt"
  fi
  export PATH="$VENV/bin:$PATH"
  export GPTJ_PYTHON="$VENV/bin/python"
  if [ -z "${LIBTORCH:-}" ]; then
    export LIBTORCH_USE_PYTORCH=1
    TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  else
    TORCH_LIB="$LIBTORCH/lib"
  fi
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# instructor pins jiter below 0.15 and the main venv's openai SDK needs 0.16 or later, so instructor gets a
# small venv of its own (no torch; ~100 MB, ~20 s), with the openai release its pins allow. Its checks talk
# HTTP only. Under target/, like the benchmark's vLLM venv: git- and docker-ignored.
INSTRUCTOR_VENV="${INSTRUCTOR_VENV:-$ROOT/target/venv-instructor}"
ensure_instructor_venv() {
  if [ ! -x "$INSTRUCTOR_VENV/bin/python" ] || ! "$INSTRUCTOR_VENV/bin/python" -c 'import instructor' 2>/dev/null; then
    log "setting up instructor's virtualenv in $INSTRUCTOR_VENV"
    python3 -m venv "$INSTRUCTOR_VENV"
    "$INSTRUCTOR_VENV/bin/pip" install -q --upgrade pip
    "$INSTRUCTOR_VENV/bin/pip" install -q instructor==1.17.0 openai==3.3.0
  fi
  export GPTJ_INSTRUCTOR_PYTHON="$INSTRUCTOR_VENV/bin/python"
}

apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_redis() {
  if port_open 6379; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis-server on 6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 50); do port_open 6379 && return; sleep 0.1; done
  echo "redis did not start" >&2; return 1
}

ensure_rabbitmq() {
  if port_open 5672; then return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting rabbitmq-server on 5672"
  rabbitmq-server -detached
  for _ in $(seq 120); do port_open 5672 && return; sleep 0.5; done
  echo "rabbitmq did not start" >&2; return 1
}

ensure_services() { ensure_redis; ensure_rabbitmq; }

# The compose runs (scripts/compose-e2e.sh, scripts/compose-faults.sh) need a Docker engine: without one, or
# with COMPOSE_E2E=0, `compose_run_or_skip WHAT` says so and exits 0.
compose_run_or_skip() {
  if [ "${COMPOSE_E2E:-1}" = 0 ]; then
    echo "$1: skipped: COMPOSE_E2E=0" >&2
    exit 0
  fi
  if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "$1: skipped: no Docker engine here (docker info failed)" >&2
    exit 0
  fi
}

# The EXIT trap of a compose run: `trap 'compose_teardown WHAT CMD "COMMAND LINE"' EXIT`, where CMD is the
# caller's function that runs `docker compose` with its files, project and profiles, and COMMAND LINE spells it
# out for the user. On failure, the services' last logs; then the project is taken down with its volumes,
# unless KEEP=1. Exits with the status the script had.
compose_teardown() {
  local status=$? what=$1 cmd=$2 spelled=$3
  if [ "$status" != 0 ]; then
    log "$what failed; the services' last logs:"
    "$cmd" ps -a >&2 || true
    "$cmd" logs --no-color --tail 40 >&2 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    log "KEEP=1: left running; remove with: $spelled down -v"
  else
    "$cmd" down -v --remove-orphans --timeout 30 >/dev/null 2>&1 || true
  fi
  exit "$status"
}

# The release build of both binaries, in $ROOT/target/release, that up.sh and worker.sh share: one profile
# and one package set, because cargo unifies dependency features over the packages it builds (`-p worker`
# alone builds serde, hyper-util, … with other features), so a different set rebuilds nearly everything.
# Cargo's output goes to stderr, so a caller's stdout stays its own.
build_release() {
  log "building the gateway and the worker (release; the first build takes ~15 minutes on 2 cores)"
  cargo build --release --locked -p gateway -p worker >&2
}

# The browser test's browser: Debian's Chromium (a browser download by a test tool fails on these machines),
# driven by Playwright for Python, which the venv holds (its wheel carries its own driver: no npm).
ensure_browser() {
  command -v chromium >/dev/null || apt_install chromium
}

# Deletes a namespace's queues and Redis keys (what a benchmark run created): delete_namespace NS [REDIS_URL].
delete_namespace() {
  local ns="$1" redis="${2:-redis://127.0.0.1:6379/}"
  # Through the broker with pika (in the venv): queues, the control exchange and the cancellations stream,
  # and the soak's own reply queue (scripts/soak.sh). RabbitMQ deletes a queue that is not there without
  # complaint.
  NS="$ns" "$VENV/bin/python" - <<'PY' >/dev/null 2>&1 || true
import os
import pika
ns = os.environ["NS"]
# A cluster's list of URLs: any node will do.
urls = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f").split(",")
conn = pika.BlockingConnection([pika.URLParameters(u.strip()) for u in urls if u.strip()])
for queue in (f"{ns}.jobs", f"{ns}.jobs.batch", f"{ns}.jobs.dead", f"{ns}.replies", f"{ns}.cancellations", f"{ns}.soak.replies"):
    conn.channel().queue_delete(queue)
conn.channel().exchange_delete(f"{ns}.control")
conn.close()
PY
  redis-cli -u "$redis" --scan --pattern "$ns:*" | xargs -r -n 500 redis-cli -u "$redis" del >/dev/null || true
}
