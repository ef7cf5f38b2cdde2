#!/usr/bin/env bash
# Runs the worker binary with the environment it needs (libtorch from the virtualenv on LD_LIBRARY_PATH),
# building it first when needed:  scripts/worker.sh generate --model models/tiny --prompt "Hello" --json
# The build is up.sh's (build_release in lib.sh), so after up.sh it is already done.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit
ensure_venv
build_release
exec "$ROOT/target/release/worker" "$@"
