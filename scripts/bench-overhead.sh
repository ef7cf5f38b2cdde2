#!/usr/bin/env bash
# Serving overhead: one job's end-to-end `/run` time minus its inference time (the worker's own
# `inference_ms`), one client, tiny model; prints a Markdown table.
#
#   scripts/bench-overhead.sh                  # REQUESTS (200), TOKENS (8), THREADS (1)
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

NS="overhead$$"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
ensure_venv
ensure_services
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building the worker and the gateway (release)"
  cargo build --release --locked -p worker -p gateway
fi
cleanup() { delete_namespace "$NS" "$REDIS_URL"; }
trap cleanup EXIT
mkdir -p target/bench-models
"$VENV/bin/python" scripts/bench_overhead.py \
  --worker "$ROOT/target/release/worker" --gateway "$ROOT/target/release/gateway" \
  --model "$ROOT/target/bench-models/tiny" --namespace "$NS" --redis-url "$REDIS_URL" \
  --requests "${REQUESTS:-200}" --tokens "${TOKENS:-8}" --threads "${THREADS:-1}" \
  --command "REQUESTS=${REQUESTS:-200} TOKENS=${TOKENS:-8} THREADS=${THREADS:-1} scripts/bench-overhead.sh"
