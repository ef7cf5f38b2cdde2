#!/usr/bin/env bash
# The README's test command: provisions what the tests need, then runs every check CI gates on.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_venv
ensure_services

log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
if [ -x scripts/check-deploy.sh ]; then
  log "deployment files"
  scripts/check-deploy.sh
fi
log "cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
