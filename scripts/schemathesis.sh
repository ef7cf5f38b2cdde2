#!/usr/bin/env bash
# Fuzzes the gateway's own OpenAPI document with schemathesis (pinned in the venv), every operation, against a
# real gateway and a worker on the tiny model, on the machine's Redis and RabbitMQ, in a namespace of its own
# (deleted at the end). scripts/test.sh runs it; run alone: scripts/schemathesis.sh [extra schemathesis flags].
#
# Every check runs except two whose premises this API does not share, on purpose:
# - positive_data_acceptance: a prompt is cleaned before its length rules apply ("$$$" is schema-valid text
#   that cleans to nothing, 422), and a parameter the chosen strategy does not use is refused; JSON Schema
#   cannot say either without lying about what the server accepts;
# - use_after_free: DELETE /v1/jobs/{id} cancels a job, which stays readable as `cancelled`, as it must.
# Knobs: EXAMPLES (25 per operation), SEED (a fixed seed: runs are reproducible), BIN (target/debug).
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit
ensure_venv
ensure_services

BIN="${BIN:-$ROOT/target/debug}"
EXAMPLES="${EXAMPLES:-25}"
SEED="${SEED:-20261201}"
NS="st$$"
PORT="${PORT:-18095}"
LOGS="$ROOT/target/schemathesis"
mkdir -p "$LOGS"
[ -x "$BIN/gateway" ] && [ -x "$BIN/worker" ] || cargo build --locked -p gateway -p worker
MODEL="$ROOT/target/schemathesis/tiny"
[ -f "$MODEL/config.json" ] || "$BIN/worker" init-tiny-model "$MODEL" --seed 0 >/dev/null

PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  delete_namespace "$NS"
}
trap cleanup EXIT

export NAMESPACE="$NS"
LISTEN="127.0.0.1:$PORT" SUBMIT_RATE_LIMIT=100000/1s READ_RATE_LIMIT=100000/1s TOKEN_RATE_LIMIT=1000000000/1s MAX_ACTIVE_JOBS_PER_CLIENT=0 RUN_TIMEOUT_S=5 \
  "$BIN/gateway" >"$LOGS/gateway.log" 2>&1 &
PIDS+=("$!")
MODEL_DIR="$MODEL" THREADS=1 "$BIN/worker" serve >"$LOGS/worker.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$PORT/v1/queue" 2>/dev/null | grep -q '"consumers":1' && break
  sleep 0.2
done

log "schemathesis on http://127.0.0.1:$PORT/openapi.json ($EXAMPLES examples per operation, seed $SEED)"
set +e
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance,use_after_free \
  --max-examples "$EXAMPLES" --seed "$SEED" --request-timeout 30 --workers 2 \
  --suppress-health-check all "$@" >"$LOGS/report.txt" 2>&1
status=$?
set -e
# The report without the tool's own tracebacks, which quote whole source files.
grep -v "^    KeyError: ('" "$LOGS/report.txt" | tail -n 40
# A failure of the API fails this script. So does any error but one: CPython 3.11 raises "AST constructor
# recursion depth mismatch" inside Hypothesis while it describes a strategy's lambda (a bug of the tool's,
# not a request the API answered); it stops that operation's coverage phase, its fuzzing and stateful phases
# still run, and the report names the operation.
if grep -q "^Failures:" "$LOGS/report.txt"; then
  echo "schemathesis found failures; the report: $LOGS/report.txt" >&2
  exit 1
fi
# Each error section of the report, and those that are not the tool's own.
read -r errors other < <("$VENV/bin/python" - "$LOGS/report.txt" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
block = text.split("= ERRORS =", 1)[1] if "= ERRORS =" in text else ""
block = re.split(r"\n=+ (?:FAILURES|WARNINGS|SUMMARY) =+\n", block)[0]
sections = [s for s in re.split(r"\n_{5,} [^\n]* _{5,}\n", block)[1:] if s.strip()]
other = [s for s in sections if "AST constructor recursion depth mismatch" not in s]
print(len(sections), len(other))
PY
)
if [ "$status" -ne 0 ] && { [ "$other" -gt 0 ] || [ "$errors" -eq 0 ]; }; then
  echo "schemathesis could not test every operation ($errors errors, $other not the tool's own); the report: $LOGS/report.txt" >&2
  exit 1
fi
tool="$errors"
log "schemathesis: no failures; $tool error(s), each the tool's own (that operation's coverage phase stopped)"
