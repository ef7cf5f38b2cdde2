"""Reference side of scripts/gpu-check.sh: runs on the GPU machine with its python3 (torch 2.11) and the carried
transformers 4.55.4 (the last release with contrastive search built in).

  gpu_check.py make-checkpoint DIR            random GPT-J-6B-shaped checkpoint, float16, sharded safetensors
  gpu_check.py make-prompt TOKENIZER N OUT    a prompt of exactly N tokens (as the worker encodes it: no
                                              special tokens added), written to OUT
  gpu_check.py reference DIR PROMPT OUT.json  transformers: last logits (.npy beside OUT), greedy and contrastive
                                              tokens and tokens/s, HBM bandwidth (read-only reductions, and a
                                              copy counted as read + write); with GPU_CHECK_BATCH_PROMPT (a
                                              file) also batched greedy at each of GPU_CHECK_HF_BATCHES
  gpu_check.py compare REF.json WORKER_LOGITS.npy
  gpu_check.py summary OUT NEW SPLIT_NEW "BATCHES" BATCH_NEW   the report, from whatever parts ran

torch is imported where it is used: making a prompt and the summary need none.
"""

import json
import os
import sys
import time

import numpy as np

NEW_TOKENS = int(os.environ.get("GPU_CHECK_NEW_TOKENS", "128"))
# Batched greedy (the comparison for the worker's continuous batching): prompt file, new tokens, batch sizes.
BATCH_PROMPT = os.environ.get("GPU_CHECK_BATCH_PROMPT", "")
BATCH_NEW_TOKENS = int(os.environ.get("GPU_CHECK_BATCH_NEW_TOKENS", "128"))
HF_BATCHES = [int(b) for b in os.environ.get("GPU_CHECK_HF_BATCHES", "1 8 32").split()]
# A dry run on a CPU machine (GPU_CHECK_DRY_RUN=1 in gpu-check.sh) uses a small model on the CPU.
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
# The reference's dtype: the worker's (float16 on the GPU; the dry run's tiny model runs float32).
DTYPE = os.environ.get("GPU_CHECK_DTYPE", "float16")


def sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def gptj_6b_config():
    from transformers import GPTJConfig

    # EleutherAI/gpt-j-6b's published config.
    return GPTJConfig(
        vocab_size=50400,
        n_positions=2048,
        n_embd=256 if SMALL else 4096,
        n_layer=4 if SMALL else 28,
        n_head=4 if SMALL else 16,
        rotary_dim=16 if SMALL else 64,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
    )


def make_checkpoint(out_dir):
    import torch
    from transformers import GPTJForCausalLM

    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_device(DEV)
    model = GPTJForCausalLM(gptj_6b_config()).to(torch.float16)
    torch.set_default_device("cpu")
    # Random init with std 0.02 gives logits of a realistic scale; keep LayerNorms at identity.
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="2GB")
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n, "seconds": round(time.time() - t0, 1), "dir": out_dir}))


def _timed(fn, reps):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def bandwidth():
    """Memory bandwidth in GB/s (1e9 B/s). A decode step streams the weights and writes next to nothing, so
    the measure for the bound is a read-only kernel: a reduction (sum, amax) over a tensor far larger than L2,
    bytes read / time. The device copy is kept for comparison, counting its bytes twice (read + write);
    `copy_read_bytes_gbs` is what the first version of this probe reported (read bytes only, half the traffic)."""
    import torch

    size = 2 * 1024**3 if DEV == "cuda" else (64 if SMALL else 256) * 1024**2  # bytes; 2 GiB is ~40x an H200's L2
    reps = 30 if DEV == "cuda" else 5
    x = torch.rand(size // 2, dtype=torch.float16, device=DEV)
    res = {"probe_bytes": size}
    res["sum_gbs"] = size / _timed(lambda: x.sum(dtype=torch.float32), reps) / 1e9
    res["amax_gbs"] = size / _timed(lambda: x.amax(), reps) / 1e9
    y = torch.empty_like(x)
    copy_s = _timed(lambda: y.copy_(x), reps)
    res["copy_rw_gbs"] = 2 * size / copy_s / 1e9
    res["copy_read_bytes_gbs"] = size / copy_s / 1e9
    res["read_gbs"] = max(res["sum_gbs"], res["amax_gbs"])
    del x, y
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return res


class _StepClock:
    """A logits processor that notes the time of each decode step (generate calls it once per new token,
    after that step's forward; the .item()-style checks in generate's loop already sync every step)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        sync()
        self.times.append(time.perf_counter())
        return scores


def batched_greedy(model, prompt_ids, batches):
    """transformers' greedy generate on `b` copies of the prompt (equal lengths, no padding), for each b:
    aggregate new tokens/s over the call and the median step time."""
    import torch
    from transformers import LogitsProcessorList

    out = []
    for b in batches:
        ids = torch.tensor([prompt_ids] * b, device=DEV)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=50256)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up at this shape
        clock = _StepClock()
        sync()
        t0 = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=BATCH_NEW_TOKENS, min_new_tokens=BATCH_NEW_TOKENS,
                             logits_processor=LogitsProcessorList([clock]), **kw)
        sync()
        dt = time.perf_counter() - t0
        steps = np.diff(clock.times) * 1e3
        new = gen[:, ids.shape[1]:]
        r = {"batch": b, "tokens_per_s": new.numel() / dt, "inter_token_ms_p50": float(np.median(steps)),
             "seconds": dt, "token_ids": new[0].tolist()}
        print(json.dumps({k: v for k, v in r.items() if k != "token_ids"}), flush=True)
        out.append(r)
        del ids, gen
    return out


def make_prompt(tokenizer_file, n, out_file):
    """Whole words of a repeated sentence until the prompt is exactly n tokens (each word of it is one token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    count = lambda t: len(tok.encode(t, add_special_tokens=False).ids)
    words = ("The quick brown fox jumps over the lazy dog. " * (n // 5 + 2)).split()
    text = ""
    for w in words:
        cand = (text + " " + w) if text else w
        if count(cand) > n:
            break
        text = cand
    if count(text) != n:
        ids = tok.encode(" ".join(words), add_special_tokens=False).ids[:n]
        text = tok.decode(ids)
    got = count(text)
    if got != n:
        sys.exit(f"could not build a {n}-token prompt (got {got})")
    with open(out_file, "w") as f:
        f.write(text)
    print(json.dumps({"prompt_tokens": got, "chars": len(text), "file": out_file}))


def timed_generate(model, ids, **kw):
    import torch

    sync()
    t0 = time.time()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, pad_token_id=50256, **kw)
    sync()
    dt = time.time() - t0
    new = out[0, ids.shape[1]:].tolist()
    return new, len(new) / dt


def reference(model_dir, prompt, out_json):
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTJForCausalLM

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids_list = tok.encode(prompt, add_special_tokens=False).ids
    t0 = time.time()
    model = GPTJForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, DTYPE)).to(DEV).eval()
    load_s = time.time() - t0
    ids = torch.tensor([ids_list], device=DEV)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float().cpu().numpy()
    np.save(out_json.replace(".json", ".logits.npy"), logits)
    with torch.no_grad():
        timed_generate(model, ids, do_sample=False)  # warm-up (kernels, allocator)
        greedy, greedy_tps = timed_generate(model, ids, do_sample=False)
        contrastive, contrastive_tps = timed_generate(model, ids, do_sample=False, penalty_alpha=0.6, top_k=4)
        batch_ids = []
        hf_batched = []
        if BATCH_PROMPT:
            with open(BATCH_PROMPT) as f:
                batch_ids = tok.encode(f.read(), add_special_tokens=False).ids
            hf_batched = batched_greedy(model, batch_ids, HF_BATCHES)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A decode step reads every weight once except the input embedding, of which it gathers one row a token.
    wte = model.transformer.wte.weight
    streamed_bytes = weight_bytes - wte.numel() * wte.element_size()
    cfg = model.config
    kv_bytes_per_token = 2 * cfg.n_layer * cfg.n_embd * wte.element_size()  # K and V
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    bw = bandwidth()
    res = {
        "prompt_ids": ids_list,
        "load_s": load_s,
        "greedy": greedy,
        "greedy_tps": greedy_tps,
        "contrastive": contrastive,
        "contrastive_tps": contrastive_tps,
        "weight_bytes": weight_bytes,
        "streamed_weight_bytes": streamed_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "bandwidth": bw,
        "read_bandwidth_gbs": bw["read_gbs"],
        # Batch-1 greedy: every step reads the streamed weights once; the KV cache of a short prompt is <1% of it.
        "bound_tps": bw["read_gbs"] * 1e9 / streamed_bytes,
        "batch_prompt_ids": batch_ids,
        "hf_batched": hf_batched,
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)",
    }
    with open(out_json, "w") as f:
        json.dump(res, f)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}))


def compare(ref_json, worker_npy):
    ref = np.load(ref_json.replace(".json", ".logits.npy")).astype(np.float64)
    ours = np.load(worker_npy).astype(np.float64).reshape(-1)[: ref.shape[0]]
    diff = np.abs(ref - ours)
    scale = np.abs(ref).max()
    res = {
        "max_abs_diff": float(diff.max()),
        "max_rel_to_scale": float(diff.max() / scale),
        "argmax_same": bool(ref.argmax() == ours.argmax()),
        "top5_ref": np.argsort(-ref)[:5].tolist(),
        "top5_ours": np.argsort(-ours)[:5].tolist(),
    }
    print(json.dumps(res))
    # float16 has 11 significant bits; over 28 layers a few units of 1e-2 relative to the logit scale is the
    # usual spread between two correct fp16 implementations.
    return 0 if res["max_rel_to_scale"] < 2e-2 and res["argmax_same"] else 1


def _load(out, name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _show(rows):
    """A table; a row of two cells (a size that did not run: its status) spans the line."""
    ncol = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if len(r) > i and len(r) > 2), default=0) for i in range(ncol)]
    for r in rows:
        if len(r) == 2 and ncol > 4:
            print(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            print("  ".join(f"{v:<{widths[i]}}" for i, v in enumerate(r)).rstrip())
    print()


def summary(out, new, split_new, batches, batch_new):
    """The report from whatever parts ran: the service table, the batch table, the parity table. Fails on a
    parity failure (tokens or logits that differ from transformers)."""
    ok = True
    ref = _load(out, "ref")
    x = lambda a, b: f"{a / b:.1f}x" if a is not None and b else "-"

    # serve: what a user of the whole service sees.
    serve = _load(out, "serve")
    b16 = _load(out, "batch-16")
    if serve and serve.get("rows"):
        print(f"the service: gateway + one worker, {serve['new_tokens']} new tokens a job, arrivals "
              f"{serve['stagger_ms']:g} ms apart, streamed (OpenAI route); TTFT and inter-token latency (ITL: a job's "
              "(end - first text) / (tokens - 1)) over jobs; the worker's mean step split from its metrics")
        rows = [("mix", "jobs", "tokens", "tok/s", "TTFT p50 ms", "p99", "ITL p50 ms", "p99", "steps",
                 "step ms", "prefill", "select", "forward", "maint.")]
        for r in serve["rows"]:
            if "status" in r:
                rows.append((f'{r["mix"]} x {r["concurrency"]}', r["status"]))
                continue
            st = r.get("step_ms", {})
            ms = lambda k: f"{st[k]:.2f}" if k in st else "-"
            rows.append((r["mix"], str(r["jobs"]), f'{r["new_tokens"]}/{r["asked_tokens"]}', f'{r["tokens_per_s"]:.0f}',
                         f'{r["ttft_ms_p50"]:.0f}', f'{r["ttft_ms_p99"]:.0f}',
                         f'{r["itl_ms_p50"]:.1f}' if r["itl_ms_p50"] is not None else "-",
                         f'{r["itl_ms_p99"]:.1f}' if r["itl_ms_p99"] is not None else "-",
                         str(st.get("steps", "-")), ms("step"), ms("prefill"), ms("select"), ms("forward"),
                         ms("maintenance")))
        _show(rows)
        greedy = {r["concurrency"]: r for r in serve["rows"] if r.get("mix") == "greedy" and "status" not in r}
        if 128 in greedy:
            t = greedy[128]["tokens_per_s"]
            print(f"goal: 128 concurrent greedy jobs through the service >= 6000 tok/s: {t:.0f} "
                  f"({'met' if t >= 6000 else 'MISSED'}; stretch 10000)")
        if 16 in greedy and b16 and "timings" in b16:
            ratio = greedy[16]["tokens_per_s"] / b16["timings"]["tokens_per_s"]
            print(f"goal: 16 concurrent jobs >= 0.9x worker generate --batch 16: {ratio:.2f}x "
                  f"({'met' if ratio >= 0.9 else 'MISSED'})")
        print()
    elif serve:
        print(f"the service: {serve.get('status', 'no result')}\n")

    # batch: the engine alone, decode-only.
    wb = {n: _load(out, f"batch-{n}") for n in batches}
    if any(r is not None for r in wb.values()):
        wb = {n: (r if r and "timings" in r else None, (r or {}).get("status", "no result")) for n, r in wb.items()}
        hf = {r["batch"]: r for r in (ref or {}).get("hf_batched", [])}
        w1 = wb.get(1, (None,))[0]
        bw = (ref or {}).get("bandwidth")
        print(f"worker generate --batch N (one process each): greedy, {batch_new} new tokens, EOS ignored; "
              "tok/s over the call, decode tok/s = N / median step (ITL); the bound: weights + KV read a step at "
              "the measured read bandwidth")
        rows = [("batch", "tok/s", "decode tok/s", "vs b1", "ITL p50 ms", "bound tok/s", "of bound",
                 "transformers tok/s", "worker/tf", "seq 0 tokens")]
        for n in batches:
            r, status = wb[n]
            if r is None:
                rows.append((str(n), status))
                continue
            t = r["timings"]
            itl = t["inter_token_ms_p50"]
            decode = n * 1000.0 / itl if itl else None
            b1 = w1["timings"] if w1 else None
            b1_decode = 1000.0 / b1["inter_token_ms_p50"] if b1 and b1["inter_token_ms_p50"] else None
            bound = None
            if ref and bw:
                step_bytes = ref["streamed_weight_bytes"] + n * ref["kv_bytes_per_token"] * (
                    r["prompt_tokens"] + (batch_new - 1) / 2)
                bound = n * bw["read_gbs"] * 1e9 / step_bytes
            h = hf.get(n)
            if n == 1:
                same = f'= transformers: first {_prefix_len(r["token_ids"], h["token_ids"])} of {batch_new}' if h else ""
            else:
                same = f'= worker b1: first {_prefix_len(r["token_ids"], w1["token_ids"])} of {batch_new}' if w1 else ""
            rows.append((str(n), f'{t["tokens_per_s"]:.1f}', f"{decode:.1f}" if decode else "-", x(decode, b1_decode),
                         f"{itl:.2f}", f"{bound:.0f}" if bound else "-", f"{decode / bound:.0%}" if bound and decode else "-",
                         f'{h["tokens_per_s"]:.1f}' if h else "-", x(t["tokens_per_s"], h and h["tokens_per_s"]) if h else "-",
                         same))
        _show(rows)

    # parity: against transformers.
    if ref:
        par = _load(out, "parity") or {}
        g, c, sm, sb = _load(out, "greedy"), _load(out, "contrastive"), _load(out, "split-map"), _load(out, "split-budget")
        rows = [("device", ref["device"], "", "")]
        rows.append(("logits max |diff| / max |logit|", f'{par.get("max_rel_to_scale", float("nan")):.2e}',
                     "argmax same" if par.get("argmax_same") else "ARGMAX DIFFERS", ""))
        ok &= bool(par.get("argmax_same"))
        same16 = g is not None and g["token_ids"][:16] == ref["greedy"][:16]
        prefix = _prefix_len(g["token_ids"], ref["greedy"]) if g else 0
        rows.append(("greedy tokens equal to transformers", f"first {prefix} of {new}", "OK" if same16 else "FAIL (<16)", ""))
        ok &= same16
        bound, bw = ref["bound_tps"], ref["bandwidth"]
        gbs = lambda k: f"{bw[k]:.0f}" if bw[k] >= 100 else f"{bw[k]:.3g}"
        rows.append((f'HBM read bandwidth (sum, amax of {bw["probe_bytes"] / 2**30:g} GiB fp16)', f'{gbs("read_gbs")} GB/s',
                     f'sum {gbs("sum_gbs")}, amax {gbs("amax_gbs")} GB/s',
                     f'copy {gbs("copy_rw_gbs")} GB/s read+write ({gbs("copy_read_bytes_gbs")} read bytes only, the old probe)'))
        rows.append(("bandwidth bound, batch 1 (weights / read bw)", f"{bound:.1f} tok/s",
                     f'{ref["streamed_weight_bytes"] / 1e9:.2f} GB read a token (all but wte) @ {gbs("read_gbs")} GB/s', ""))
        rows.append(("", "worker tok/s", "transformers tok/s", "worker/transformers, worker/bound"))
        tps = lambda r: r["timings"]["new_tokens"] / max(r["timings"]["decode_ms"] + r["timings"]["prefill_ms"], 1) * 1000
        for name, r, h in (("greedy batch 1", g, ref["greedy_tps"]), ("contrastive batch 1", c, ref["contrastive_tps"])):
            if r:
                rows.append((name, f"{tps(r):.1f}", f"{h:.1f}", f"{tps(r) / h:.2f}x, {tps(r) / bound:.0%}"))
        for name, r in (("split --device-map", sm), ("split --max-memory", sb)):
            if r:
                same = r["token_ids"] == (g["token_ids"][:split_new] if g else None)
                ok &= same
                rows.append((name, f"{tps(r):.2f}", "", "same tokens as all on one device" if same else "TOKENS DIFFER"))
        _show(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make-checkpoint":
        make_checkpoint(sys.argv[2])
    elif cmd == "make-prompt":
        make_prompt(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif cmd == "reference":
        reference(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    elif cmd == "summary":
        sys.exit(summary(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(b) for b in sys.argv[5].split()],
                         int(sys.argv[6])))
    else:
        sys.exit(f"unknown command {cmd}")
