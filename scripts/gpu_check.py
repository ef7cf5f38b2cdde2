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
"""

import json
import os
import sys
import time

import numpy as np
import torch

NEW_TOKENS = int(os.environ.get("GPU_CHECK_NEW_TOKENS", "128"))
# Batched greedy (the comparison for the worker's continuous batching): prompt file, new tokens, batch sizes.
BATCH_PROMPT = os.environ.get("GPU_CHECK_BATCH_PROMPT", "")
BATCH_NEW_TOKENS = int(os.environ.get("GPU_CHECK_BATCH_NEW_TOKENS", "128"))
HF_BATCHES = [int(b) for b in os.environ.get("GPU_CHECK_HF_BATCHES", "1 8 32").split()]
# A dry run on a CPU machine (GPU_CHECK_DRY_RUN=1 in gpu-check.sh) uses a small model on the CPU.
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"


def sync():
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
    size = 2 * 1024**3 if DEV == "cuda" else 256 * 1024**2  # bytes; 2 GiB is ~40x an H200's L2
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
    sync()
    t0 = time.time()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, pad_token_id=50256, **kw)
    sync()
    dt = time.time() - t0
    new = out[0, ids.shape[1]:].tolist()
    return new, len(new) / dt


def reference(model_dir, prompt, out_json):
    from tokenizers import Tokenizer
    from transformers import GPTJForCausalLM

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids_list = tok.encode(prompt, add_special_tokens=False).ids
    t0 = time.time()
    model = GPTJForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float16).to(DEV).eval()
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
    kv_bytes_per_token = 2 * cfg.n_layer * cfg.n_embd * 2  # K and V, float16
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
    else:
        sys.exit(f"unknown command {cmd}")
