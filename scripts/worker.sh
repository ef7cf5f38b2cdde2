#!/usr/bin/env bash
# Runs the worker binary with the environment it needs (libtorch from the virtualenv on LD_LIBRARY_PATH),
# building it first when needed:  scripts/worker.sh generate --model models/tiny --prompt "Hello" --json
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_venv
cargo build --release --locked --quiet -p worker >&2
exec "$ROOT/target/release/worker" "$@"
