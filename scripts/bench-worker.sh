#!/usr/bin/env bash
# Benchmarks `worker generate` against transformers' `generate` on the same checkpoints (tiny 3×64 and
# medium 8×1024), same prompt, thread count and token count, in one run; prints a Markdown report (the
# table in docs/benchmarks.md comes from here).
#
#   scripts/bench-worker.sh                  # THREADS defaults to the number of CPUs
#   THREADS=2 REPEAT=5 MODELS=/tmp/bench-models scripts/bench-worker.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_venv
log "building the worker (release)"
cargo build --release --locked -p worker
MODELS="${MODELS:-$ROOT/target/bench-models}"
mkdir -p "$MODELS"
log "benchmarking (models in $MODELS)"
"$VENV/bin/python" scripts/bench_worker.py \
  --worker "$ROOT/target/release/worker" \
  --models "$MODELS" \
  --threads "${THREADS:-$(nproc)}" \
  --repeat "${REPEAT:-3}" \
  --tiny-tokens "${TINY_TOKENS:-128}" \
  --medium-tokens "${MEDIUM_TOKENS:-32}"
