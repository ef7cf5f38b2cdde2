#!/usr/bin/env bash
# Proves the worker on a real GPU with a model of GPT-J-6B's shape (random weights, float16): CUDA is live in
# the binary, logits and greedy tokens match transformers, speed against transformers and the bandwidth bound
# (HBM read bandwidth from read-only reductions), a split over cuda:0 + CPU gives the same tokens, and
# continuous batching (`worker generate --batch N`, 128 tokens in / 128 out, N = 1, 8, 32, 128) against
# batch 1, the bandwidth bound and transformers' batched greedy. One run, at most ~8 minutes (batching runs
# that would not fit GPU_CHECK_BUDGET_S are skipped, and say so); prints one table and writes the whole log
# under $OUT (or ./gpu-check-out).
#
# Prepare on the CPU build machine:   scripts/build-gpu-bundle.sh   (worker binary + transformers wheels)
# Run on the GPU machine (device tool): bash scripts/gpu-check.sh    with carry: target/gpu-bundle, .whl
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

WORKER="${WORKER_BIN:-target/gpu-bundle/worker}"
MODEL="${GPU_CHECK_MODEL:-/tmp/gptj-6b-random}"
NEW="${GPU_CHECK_NEW_TOKENS:-128}"
SPLIT_NEW="${GPU_CHECK_SPLIT_NEW_TOKENS:-16}"
PROMPT="The quick brown fox jumps over the lazy dog, and then"
export GPU_CHECK_NEW_TOKENS="$NEW"
# Continuous batching: batch sizes, prompt and output lengths; transformers' batched greedy for comparison.
BATCHES="${GPU_CHECK_BATCHES:-1 8 32 128}"
BATCH_IN="${GPU_CHECK_BATCH_PROMPT_TOKENS:-128}"
BATCH_NEW="${GPU_CHECK_BATCH_NEW_TOKENS:-128}"
HF_BATCHES="${GPU_CHECK_HF_BATCHES:-1 8 32}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}" # seconds for the whole script; the batching runs fit inside it or skip
# GPU_CHECK_DRY_RUN=1 rehearses every step on a CPU machine with a small model (cuda:0 becomes cpu).
DEV=cuda:0; SPLIT_MAP='cuda:0=0-13'; SPLIT_BUDGET='cuda:0=6GiB,cpu=100GiB'
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  export GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1
  MODEL="${GPU_CHECK_MODEL:-/tmp/gptj-small-random}"; DEV=cpu; SPLIT_MAP='cpu=0-1'; SPLIT_BUDGET='cpu=1GiB'
  # float16 on two CPU cores: small batches and short outputs, the same steps.
  BATCHES="${GPU_CHECK_BATCHES:-1 2 4 8}"; BATCH_NEW="${GPU_CHECK_BATCH_NEW_TOKENS:-16}"
  HF_BATCHES="${GPU_CHECK_HF_BATCHES:-1 2 4}"; BUDGET="${GPU_CHECK_BUDGET_S:-900}"
  # On the build machine: the project's virtualenv and whichever worker build is there.
  if ! python3 -c 'import torch' 2>/dev/null && [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
  if [ -z "${WORKER_BIN:-}" ] && [ ! -x "$WORKER" ]; then
    for w in target/release/worker target/debug/worker; do [ -x "$w" ] && { WORKER="$w"; break; }; done
  fi
fi
export GPU_CHECK_BATCH_NEW_TOKENS="$BATCH_NEW" GPU_CHECK_HF_BATCHES="$HF_BATCHES"
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
echo "worker: $WORKER"

step "1. CUDA inside the worker binary"
"$WORKER" info --json | tee "$OUT/info.json"
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] || python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["cuda_available"] else 1)' "$OUT/info.json" \
  || { echo "FAIL: tch::Cuda::is_available() is false in the worker binary"; exit 1; }

step "2. random GPT-J-6B checkpoint (float16, sharded safetensors)"
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  python3 scripts/gpu_check.py make-checkpoint "$MODEL" || exit 1
fi
cp shared/assets/gptj-tokenizer.json "$MODEL/tokenizer.json"
du -sh "$MODEL"
# The batching prompt: whole words, exactly $BATCH_IN tokens as the worker encodes it (`worker generate` takes
# the prompt as is, no special tokens added).
python3 scripts/gpu_check.py make-prompt shared/assets/gptj-tokenizer.json "$BATCH_IN" "$OUT/batch-prompt.txt" || exit 1
BATCH_PROMPT="$(cat "$OUT/batch-prompt.txt")"
export GPU_CHECK_BATCH_PROMPT="$OUT/batch-prompt.txt"

step "3+4+6. transformers reference: logits, greedy and contrastive tokens/s, batched greedy ($HF_BATCHES), bandwidth"
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

step "6. continuous batching: greedy float16, $BATCH_IN tokens in / $BATCH_NEW out, batch ${BATCHES// /, }"
# One process per batch size (each loads the model again, from the page cache). A size runs twice (the
# faster run counts) when twice its worst-case time -- the last size's time scaled by the batch ratio, as if
# batching gained nothing -- fits the budget, once when once fits, and is skipped otherwise.
batch_json() { python3 -c 'import json,sys; print(json.dumps(dict(batch=int(sys.argv[1]), status=sys.argv[2])))' "$1" "$2"; }
if ! "$WORKER" generate --help 2>/dev/null | grep -q -- '--batch'; then
  echo "worker generate has no --batch flag: the batching rows say 'flag missing'"
  for n in $BATCHES; do batch_json "$n" "flag missing" >"$OUT/batch-$n.json"; done
else
  prev_n=0; prev_ms=0
  for n in $BATCHES; do
    left=$((BUDGET - SECONDS - 15)) # 15 s for the summary and slack
    load_s=30                       # a 12 GB load from the page cache, generously
    guess_s=$(( prev_n > 0 ? (prev_ms * n / prev_n + 999) / 1000 : 60 ))
    if [ $((load_s + 2 * guess_s)) -le "$left" ]; then repeat=2
    elif [ $((load_s + guess_s)) -le "$left" ]; then repeat=1
    else
      echo "batch $n: skipped, ~$((load_s + guess_s)) s needed and $left s left of GPU_CHECK_BUDGET_S=$BUDGET"
      batch_json "$n" "skipped (time budget)" >"$OUT/batch-$n.json"; continue
    fi
    echo "--- batch $n (--repeat $repeat, timeout $left s)"
    timeout "$left" "$WORKER" generate --model "$MODEL" --prompt "$BATCH_PROMPT" --dtype float16 --device "$DEV" \
      --strategy greedy --max-new-tokens "$BATCH_NEW" --min-new-tokens "$BATCH_NEW" --batch "$n" --repeat "$repeat" \
      --json >"$OUT/batch-$n.json" 2>"$OUT/batch-$n.err"
    rc=$?
    if [ "$rc" != 0 ]; then
      echo "FAIL: worker batch $n (exit $rc)"; tail -5 "$OUT/batch-$n.err"; fail=1
      batch_json "$n" "$([ "$rc" = 124 ] && echo "timed out after $left s" || echo "failed, exit $rc")" >"$OUT/batch-$n.json"
      continue
    fi
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("text"); print(json.dumps(d))' "$OUT/batch-$n.json"
    prev_n=$n
    prev_ms=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(int(int(sys.argv[2]) * int(sys.argv[3]) * 1000 / max(d["timings"]["tokens_per_s"], 1e-3)))' \
      "$OUT/batch-$n.json" "$n" "$BATCH_NEW")
  done
fi

step "7. summary"
python3 - "$OUT" "$NEW" "$SPLIT_NEW" "$BATCHES" "$BATCH_NEW" <<'PY' || fail=1
import json, os, sys
out, new, split_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batches, batch_new = [int(b) for b in sys.argv[4].split()], int(sys.argv[5])
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
bw = ref["bandwidth"]
gbs = lambda k: f"{bw[k]:.0f}" if bw[k] >= 100 else f"{bw[k]:.3g}"
rows.append((f'HBM read bandwidth (sum, amax of {bw["probe_bytes"]/2**30:g} GiB fp16)', f'{gbs("read_gbs")} GB/s',
             f'sum {gbs("sum_gbs")}, amax {gbs("amax_gbs")} GB/s',
             f'copy {gbs("copy_rw_gbs")} GB/s read+write ({gbs("copy_read_bytes_gbs")} read bytes only, the old probe)'))
rows.append(("bandwidth bound, batch 1 (weights / read bw)", f'{bound:.1f} tok/s',
             f'{ref["streamed_weight_bytes"]/1e9:.2f} GB read a token (all but wte) @ {gbs("read_gbs")} GB/s', ""))
rows.append(("", "worker tok/s", "transformers tok/s", "worker/transformers, worker/bound"))
for name, r, hf in (("greedy fp16 batch 1", g, ref["greedy_tps"]), ("contrastive fp16 batch 1", c, ref["contrastive_tps"])):
    if r:
        rows.append((name, f"{tps(r):.1f}", f"{hf:.1f}", f"{tps(r)/hf:.2f}x, {tps(r)/bound:.0%}"))
for name, r in (("split cuda:0=0-13 + cpu", sm), ("split max-memory cuda:0=6GiB", sb)):
    if r:
        same = r["token_ids"] == (g["token_ids"][:split_new] if g else None)
        ok &= same
        rows.append((name, f"{tps(r):.2f}", "", "same tokens as all-GPU" if same else "TOKENS DIFFER"))

# Continuous batching: worker --batch N against its batch 1, the bandwidth bound (weights + the KV cache each
# step reads, at the mean context of the decode) and transformers' batched greedy on the same prompt.
def prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
def x(a, b):
    return f"{a / b:.1f}x" if a is not None and b else "-"
wb = {n: load(f"batch-{n}") for n in batches}
wb = {n: (r if r and "timings" in r else None, (r or {}).get("status", "no result")) for n, r in wb.items()}
hf = {r["batch"]: r for r in ref.get("hf_batched", [])}
prompt_in = len(ref.get("batch_prompt_ids", []))
w1 = wb.get(1, (None,))[0]
hf1 = hf.get(1)
brows = [("batch", "worker tok/s", "vs b1", "p50 ITL ms", "vs b1", "bound tok/s", "of bound",
          "transformers tok/s", "vs b1", "p50 ITL ms", "worker/tf", "seq 0 tokens")]
results = {}
for n in batches:
    r, status = wb[n]
    h = hf.get(n)
    if r is None:
        brows.append((str(n), status))
        continue
    t = r["timings"]
    tok_s, itl = t["tokens_per_s"], t["inter_token_ms_p50"]
    results[n] = tok_s
    step_bytes = ref["streamed_weight_bytes"] + n * ref["kv_bytes_per_token"] * (r["prompt_tokens"] + (batch_new - 1) / 2)
    nb = n * bw["read_gbs"] * 1e9 / step_bytes
    if n == 1:
        same = (f'= transformers: first {prefix_len(r["token_ids"], hf1["token_ids"])} of {batch_new}' if hf1 else "")
    else:
        same = f'= worker b1: first {prefix_len(r["token_ids"], w1["token_ids"])} of {batch_new}' if w1 else ""
    b1 = w1["timings"] if w1 else None
    brows.append((str(n), f"{tok_s:.1f}", x(tok_s, b1 and b1["tokens_per_s"]), f"{itl:.2f}",
                  x(itl, b1 and b1["inter_token_ms_p50"]), f"{nb:.0f}", f"{tok_s / nb:.0%}",
                  f'{h["tokens_per_s"]:.1f}' if h else "not run", x(h and h["tokens_per_s"], hf1 and hf1["tokens_per_s"]) if h else "-",
                  f'{h["inter_token_ms_p50"]:.2f}' if h else "-", x(tok_s, h and h["tokens_per_s"]) if h else "-", same))
if 128 in results and w1:
    r128, ratio = results[128], results[128] / w1["timings"]["tokens_per_s"]
    goal = (f"goal at batch 128: {r128:.0f} tok/s (>= 6000: {'met' if r128 >= 6000 else 'MISSED'}), "
            f"{ratio:.1f}x batch 1 (>= 20x: {'met' if ratio >= 20 else 'MISSED'})")
else:
    goal = "goal at batch 128 (>= 6000 tok/s, >= 20x batch 1): not measured in this run"

def show(rows):
    ncol = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if len(r) > i and len(r) > 2), default=0) for i in range(ncol)]
    for r in rows:
        if len(r) == 2 and len(rows[0]) > 4:  # a batch size that did not run: its status spans the row
            print(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            print("  ".join(f"{v:<{widths[i]}}" for i, v in enumerate(r)).rstrip())
print()
show(rows)
print()
print(f"continuous batching: greedy float16, {prompt_in} tokens in / {batch_new} out, worker --batch N "
      f"(one process each), transformers generate on N copies; ITL = inter-token latency (median step)")
show(brows)
print(goal)
sys.exit(0 if ok else 1)
PY
echo "gpu-check finished in ${SECONDS}s, fail=$fail"
exit $fail
