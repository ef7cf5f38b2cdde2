"""The measurements behind scripts/bench-worker.sh (run that, not this).

Tokens per second of `worker generate` against transformers' `generate` on the same checkpoints, prompt,
thread count and token count (min_new_tokens = max_new_tokens, so both generate exactly N tokens); the
memory-bandwidth bound of the medium config; peak resident memory while loading. Prints a Markdown report.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--worker", required=True)
p.add_argument("--models", required=True, help="directory for the tiny and medium checkpoints")
p.add_argument("--threads", type=int, required=True)
p.add_argument("--repeat", type=int, default=3)
p.add_argument("--tiny-tokens", type=int, default=128)
p.add_argument("--medium-tokens", type=int, default=32)
args = p.parse_args()

HERE = os.path.dirname(os.path.abspath(__file__))
HF = os.path.join(HERE, "..", "worker", "tests", "py", "hf_generate.py")
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"


def log(msg):
    print(f"--- {msg}", file=sys.stderr, flush=True)


def model_dir(preset):
    d = os.path.join(args.models, preset)
    if not os.path.exists(os.path.join(d, "config.json")):
        log(f"writing the {preset} checkpoint to {d}")
        subprocess.run([args.worker, "init-tiny-model", d, "--preset", preset], check=True, stdout=subprocess.DEVNULL)
    return d


def checkpoint_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith((".safetensors", ".bin")))


def weight_bytes_per_token(d, dtype_bytes):
    """Bytes of weights one decoding step reads: every block, the final norm and the head (of the embedding
    only one row, which is negligible)."""
    c = json.load(open(os.path.join(d, "config.json")))
    e, v = c["n_embd"], c["vocab_size"]
    inner = c.get("n_inner") or 4 * e
    block = 4 * e * e + e * inner + inner + inner * e + e + 2 * e
    return dtype_bytes * (c["n_layer"] * block + 2 * e + v * e + v)


def read_bandwidth():
    """Bytes per second that `threads` threads read from memory: the best of two probes over 512 MiB of
    float32, a plain sum and a matrix-vector product (the access pattern of a decoding step), each the
    fastest of several runs."""
    torch.set_num_threads(args.threads)
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    w, v = x.view(32768, 4096), torch.ones(4096)
    probes = {"sum": lambda: x.sum(), "mv": lambda: torch.mv(w, v)}
    best = {}
    for name, f in probes.items():
        f()
        best[name] = x.numel() * 4 / min(_timed(f) for _ in range(7))
    del x, w
    log("bandwidth probes: " + ", ".join(f"{k} {b / 1e9:.1f} GB/s" for k, b in best.items()))
    return max(best.values()), best


def _timed(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def worker_tps(d, strategy, n, dtype="float32"):
    out = subprocess.run(
        [args.worker, "generate", "--model", d, "--prompt", PROMPT, "--strategy", strategy,
         "--max-new-tokens", str(n), "--min-new-tokens", str(n), "--threads", str(args.threads),
         "--dtype", dtype, "--repeat", str(args.repeat + 1), "--json"],
        check=True, capture_output=True, text=True,
    )
    r = json.loads(out.stdout)
    assert r["timings"]["new_tokens"] == n, r
    return r["timings"]["tokens_per_s"]


def hf_tps(d, strategy, n, dtype="float32"):
    out = subprocess.run(
        [sys.executable, HF, d, "--bench", PROMPT, "--threads", str(args.threads), "--strategy", strategy,
         "--max-new-tokens", str(n), "--repeat", str(args.repeat), "--dtype", dtype],
        check=True, capture_output=True, text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["new_tokens"] == n, r
    return r["tokens_per_s"]


def peak_rss(cmd):
    """Peak resident bytes of `cmd`, measured by /usr/bin/time (a fork of this Python process would count
    Python's own pages until the exec)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, check=True)
    return int(out.stderr.strip().splitlines()[-1]) * 1024


def peak_rss_loading(d, dtype):
    """Peak resident bytes of `worker generate` loading `d` and generating one token."""
    return peak_rss([args.worker, "generate", "--model", d, "--prompt", "Hi", "--strategy", "greedy",
                     "--max-new-tokens", "1", "--threads", str(args.threads), "--dtype", dtype])


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


flags = set()
for line in open("/proc/cpuinfo"):
    if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
bf16_flags = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"))

tiny, medium = model_dir("tiny"), model_dir("medium")
log("measuring memory-read bandwidth")
bw, probes = read_bandwidth()

rows = []
for name, d, n in [("tiny 3×64", tiny, args.tiny_tokens), ("medium 8×1024", medium, args.medium_tokens)]:
    for strategy in ["greedy", "contrastive"]:
        log(f"{name} {strategy}: transformers")
        theirs = hf_tps(d, strategy, n)
        for dtype in ["float32", "bfloat16"] if d == medium else ["float32"]:
            log(f"{name} {strategy} {dtype}: worker")
            ours = worker_tps(d, strategy, n, dtype)
            bound = None
            if d == medium:
                bound = bw / weight_bytes_per_token(d, 4 if dtype == "float32" else 2)
            rows.append((name, strategy, dtype, n, ours, theirs, bound))

log("peak memory while loading")
runtime = peak_rss([args.worker, "info"])
rss = [
    ("tiny 3×64", "float32", tiny, peak_rss_loading(tiny, "float32")),
    ("medium 8×1024", "float32", medium, peak_rss_loading(medium, "float32")),
    ("medium 8×1024", "bfloat16", medium, peak_rss_loading(medium, "bfloat16")),
]

mib = 1024 * 1024
print(f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, threads used: {args.threads}; "
      f"bfloat16-relevant CPU flags: {', '.join(bf16_flags) or 'none'}; torch {torch.__version__}")
print()
print(f"Memory-read bandwidth ({args.threads} threads, 512 MiB float32; best of "
      + ", ".join(f"{k} {b / 1e9:.1f}" for k, b in probes.items()) + f" GB/s): {bw / 1e9:.1f} GB/s. "
      f"Medium weights read per token: {weight_bytes_per_token(medium, 4) / 1e6:.0f} MB float32, "
      f"{weight_bytes_per_token(medium, 2) / 1e6:.0f} MB bfloat16.")
print()
print("| config | strategy | worker dtype | new tokens | worker tok/s | transformers f32 tok/s | speed-up | "
      "bandwidth bound tok/s | worker / bound |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for name, strategy, dtype, n, ours, theirs, bound in rows:
    b = f"{bound:.1f}" if bound else "–"
    frac = f"{100 * ours / bound:.0f}%" if bound else "–"
    print(f"| {name} | {strategy} | {dtype} | {n} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}× | {b} | {frac} |")
print()
print(f"Peak RSS of `worker info` (libtorch loaded, no model): {runtime / mib:.0f} MiB; the last column "
      "subtracts it.")
print()
print("| config | dtype in memory | checkpoint on disk | peak RSS (load + 1 token) | peak / checkpoint | "
      "(peak − runtime) / checkpoint |")
print("|---|---|---:|---:|---:|---:|")
for name, dtype, d, peak in rss:
    size = checkpoint_bytes(d)
    print(f"| {name} | {dtype} | {size / mib:.0f} MiB | {peak / mib:.0f} MiB | {peak / size:.2f} | "
          f"{(peak - runtime) / size:.2f} |")
