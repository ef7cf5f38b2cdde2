#!/usr/bin/env bash
# Proves the worker on a real GPU with a model of GPT-J-6B's shape (random weights, float16): CUDA is live in
# the binary, logits and greedy tokens match transformers, speed against transformers and the bandwidth bound,
# and a split over cuda:0 + CPU gives the same tokens. One run, at most ~8 minutes; prints one table and
# writes the whole log under $OUT (or ./gpu-check-out).
#
# Prepare on the CPU build machine:   scripts/build-gpu-bundle.sh   (worker binary + transformers wheels)
# Run on the GPU machine (device tool): bash scripts/gpu-check.sh    with carry: target/gpu-bundle, .whl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

WORKER="${WORKER_BIN:-target/gpu-bundle/worker}"
MODEL="${GPU_CHECK_MODEL:-/tmp/gptj-6b-random}"
NEW="${GPU_CHECK_NEW_TOKENS:-128}"
SPLIT_NEW="${GPU_CHECK_SPLIT_NEW_TOKENS:-16}"
PROMPT="The quick brown fox jumps over the lazy dog, and then"
export GPU_CHECK_NEW_TOKENS="$NEW"
# GPU_CHECK_DRY_RUN=1 rehearses every step on a CPU machine with a small model (cuda:0 becomes cpu).
DEV=cuda:0; SPLIT_MAP='cuda:0=0-13'; SPLIT_BUDGET='cuda:0=6GiB,cpu=100GiB'
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  export GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1
  MODEL="${GPU_CHECK_MODEL:-/tmp/gptj-small-random}"; DEV=cpu; SPLIT_MAP='cpu=0-1'; SPLIT_BUDGET='cpu=1GiB'
fi
fail=0
step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

# transformers 4.55.4 (contrastive search built in) and the versions it needs, carried as wheels.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "1. CUDA inside the worker binary"
"$WORKER" info --json | tee "$OUT/info.json"
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] || python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["cuda_available"] else 1)' "$OUT/info.json" \
  || { echo "FAIL: tch::Cuda::is_available() is false in the worker binary"; exit 1; }

step "2. random GPT-J-6B checkpoint (float16, sharded safetensors)"
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  python3 scripts/gpu_check.py make-checkpoint "$MODEL" || exit 1
fi
cp worker/assets/gptj-tokenizer.json "$MODEL/tokenizer.json"
du -sh "$MODEL"

step "3+4. transformers reference: logits, greedy and contrastive tokens/s, bandwidth"
python3 scripts/gpu_check.py reference "$MODEL" "$PROMPT" "$OUT/ref.json" || exit 1

run_worker() { # name, extra args...
  local name="$1"; shift
  "$WORKER" generate --model "$MODEL" --prompt "$PROMPT" --dtype float16 --json "$@" >"$OUT/$name.json" \
    2>"$OUT/$name.err" || { echo "FAIL: worker $name"; tail -5 "$OUT/$name.err"; fail=1; }
  cat "$OUT/$name.json"; echo
}

step "3. worker logits parity"
"$WORKER" score --model "$MODEL" --prompt "$PROMPT" --dtype float16 --device "$DEV" --out "$OUT/worker.logits.npy" \
  && python3 scripts/gpu_check.py compare "$OUT/ref.json" "$OUT/worker.logits.npy" | tee "$OUT/parity.json" || fail=1

step "4. worker speed, all on cuda:0"
run_worker greedy --device "$DEV" --repeat 2 --strategy greedy --max-new-tokens "$NEW" --min-new-tokens "$NEW"
run_worker contrastive --device "$DEV" --repeat 2 --strategy contrastive --max-new-tokens "$NEW" --min-new-tokens "$NEW"

step "5. split: layers 0-13 on cuda:0, the rest on the CPU; and --max-memory cuda:0=6GiB"
run_worker split-map --device-map "$SPLIT_MAP" --strategy greedy --max-new-tokens "$SPLIT_NEW" --min-new-tokens "$SPLIT_NEW"
run_worker split-budget --max-memory "$SPLIT_BUDGET" --strategy greedy --max-new-tokens "$SPLIT_NEW" --min-new-tokens "$SPLIT_NEW"

step "6. summary"
python3 - "$OUT" "$NEW" "$SPLIT_NEW" <<'PY' || fail=1
import json, os, sys
out, new, split_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ref = json.load(open(os.path.join(out, "ref.json")))
def load(n):
    try:
        return json.load(open(os.path.join(out, n + ".json")))
    except Exception:
        return None
def tps(r):
    t = r["timings"]
    return t["new_tokens"] / max(t["decode_ms"] + t["prefill_ms"], 1) * 1000
par = json.load(open(os.path.join(out, "parity.json"))) if os.path.exists(os.path.join(out, "parity.json")) else {}
g, c, sm, sb = load("greedy"), load("contrastive"), load("split-map"), load("split-budget")
ok = True
rows = [("device", ref["device"], "", "")]
rows.append(("logits max |diff| / max |logit|", f'{par.get("max_rel_to_scale", float("nan")):.2e}', "argmax same" if par.get("argmax_same") else "ARGMAX DIFFERS", ""))
same16 = g is not None and g["token_ids"][:16] == ref["greedy"][:16]
prefix = 0
if g is not None:
    while prefix < min(len(g["token_ids"]), len(ref["greedy"])) and g["token_ids"][prefix] == ref["greedy"][prefix]:
        prefix += 1
rows.append(("greedy tokens equal to transformers", f"first {prefix} of {new}", "OK" if same16 else "FAIL (<16)", ""))
ok &= same16
bound = ref["bound_tps"]
rows.append(("bandwidth bound (weights / copy bw)", f'{bound:.1f} tok/s', f'{ref["weight_bytes"]/1e9:.2f} GB @ {ref["copy_bandwidth_gbs"]:.0f} GB/s', ""))
rows.append(("", "worker tok/s", "transformers tok/s", "worker/transformers, worker/bound"))
for name, r, hf in (("greedy fp16 batch 1", g, ref["greedy_tps"]), ("contrastive fp16 batch 1", c, ref["contrastive_tps"])):
    if r:
        rows.append((name, f"{tps(r):.1f}", f"{hf:.1f}", f"{tps(r)/hf:.2f}x, {tps(r)/bound:.0%}"))
for name, r in (("split cuda:0=0-13 + cpu", sm), ("split max-memory cuda:0=6GiB", sb)):
    if r:
        same = r["token_ids"] == (g["token_ids"][:split_new] if g else None)
        ok &= same
        rows.append((name, f"{tps(r):.2f}", "", "same tokens as all-GPU" if same else "TOKENS DIFFER"))
w = max(len(a) for a, *_ in rows)
print()
for a, b, c_, d in rows:
    print(f"{a:<{w}}  {b:<22} {c_:<28} {d}")
sys.exit(0 if ok else 1)
PY
echo "gpu-check finished in ${SECONDS}s, fail=$fail"
exit $fail
