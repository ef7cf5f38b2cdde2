#!/usr/bin/env bash
# The batch engine's mechanics on a CPU that behaves like a GPU host (worker/examples/bench_engine.rs): a
# deep, narrow GPT-J (28 layers × 32 wide) on one libtorch thread, where a step costs mostly per-operation
# host work, as it does when a GPU runs the arithmetic. The batch is kept full while jobs of staggered
# lengths and mixed strategies join and leave; equal-length greedy jobs in the same run are the reference
# each ratio divides by. Prints one table a run: tokens/s and the ratio to equal lengths, the median decode
# step split into prefill / selection / forward / cache maintenance, cache copies and device→host readbacks
# per decode step. Two more rows rerun the equal-length jobs with a JSON Schema each and with logprobs (5
# alternatives): what structured output and logprobs cost. A second table: a 2,000-token prompt joins 32
# decoding jobs, prefilled 256 tokens a step and then all at once; the running jobs' inter-token latency
# (one decode step) before it joins and until its first token. The tables in docs/benchmarks.md come from here.
#
#   scripts/bench-engine.sh                        # three runs: 256 jobs, batch 64, 64 new tokens a job
#   RUNS=1 JOBS=128 BATCH=32 TOKENS=32 scripts/bench-engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_venv
log "building the engine benchmark (release)"
cargo build --release --locked -p worker --example bench_engine >&2
for run in $(seq "${RUNS:-3}"); do
  log "run $run of ${RUNS:-3}"
  "$ROOT/target/release/examples/bench_engine" \
    --jobs "${JOBS:-256}" --batch "${BATCH:-64}" --tokens "${TOKENS:-64}" --threads "${THREADS:-1}"
done
