#!/usr/bin/env bash
# The README's test command: provisions what the tests need, then runs every check CI gates on.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_venv
ensure_services
ensure_browser

log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
if [ -x scripts/check-deploy.sh ]; then
  log "deployment files"
  scripts/check-deploy.sh
fi
log "cargo test"
set -o pipefail
TEST_LOG="$(mktemp)"
trap 'rm -f "$TEST_LOG"' EXIT
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$TEST_LOG"
# One closing line over every test binary (cargo's last line is a doc-test run that may hold no test).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$TEST_LOG"
log "the GPU check, dry run: every step of scripts/gpu-check.sh on the tiny model, on the CPU (the binaries cargo test built)"
WORKER_BIN=target/debug/worker GATEWAY_BIN=target/debug/gateway OUT=target/gpu-check-dry-run bash scripts/gpu-check.sh --dry-run
log "schemathesis over every operation of the OpenAPI document"
scripts/schemathesis.sh
log "soak under faults, short (scripts/soak.sh; the full one and its figures: docs/reliability.md)"
SHORT=1 scripts/soak.sh
log "the compose deployment end to end (scripts/compose-e2e.sh: builds the images, runs the cpu profile; skips without a Docker engine)"
scripts/compose-e2e.sh
