"""Reference side of scripts/gpu-check.sh: runs on the GPU machine with its python3 (torch 2.11) and the carried
transformers 4.55.4 (the last release with contrastive search built in).

  gpu_check.py make-checkpoint DIR            random GPT-J-6B-shaped checkpoint, float16, sharded safetensors
  gpu_check.py reference DIR PROMPT OUT.json  transformers: last logits (.npy beside OUT), greedy and contrastive
                                              tokens and tokens/s, device-copy bandwidth
  gpu_check.py compare REF.json WORKER_LOGITS.npy
"""

import json
import os
import sys
import time

import numpy as np
import torch

NEW_TOKENS = int(os.environ.get("GPU_CHECK_NEW_TOKENS", "128"))
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


def bandwidth_gbs():
    """Device-to-device copy bandwidth in GB/s counting bytes read only (what a weight read costs)."""
    size = 2 * 1024**3 if DEV == "cuda" else 256 * 1024**2
    x = torch.empty(size, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.time()
    reps = 10
    for _ in range(reps):
        y.copy_(x)
    sync()
    dt = time.time() - t0
    del x, y
    return reps * size / dt / 1e9


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
    ids_list = tok.encode(prompt).ids
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
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    bw = bandwidth_gbs()
    res = {
        "prompt_ids": ids_list,
        "load_s": load_s,
        "greedy": greedy,
        "greedy_tps": greedy_tps,
        "contrastive": contrastive,
        "contrastive_tps": contrastive_tps,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gbs": bw,
        "bound_tps": bw * 1e9 / weight_bytes,
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
    elif cmd == "reference":
        reference(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")
