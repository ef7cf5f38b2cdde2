"""Writes a random tiny GPT-J with transformers, in one of the layouts published for GPT-J, and (optionally)
transformers' last-position logits for some prompts, so the Rust tests can check the worker against them.

    python make_hf_checkpoint.py OUT_DIR --format safetensors-sharded|safetensors|bin|bin-sharded
        [--seed N] [--prompts '[[ids], ...]']   # writes OUT_DIR/hf_logits.json

Every parameter is randomised (biases and LayerNorms too, not left at transformers' zeros and ones), so
every term of the forward pass is exercised.
"""

import argparse
import json
import os
import sys

import torch
from transformers import GPTJConfig, GPTJForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from hf_logits import last_logits  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--format", required=True, choices=["safetensors-sharded", "safetensors", "bin", "bin-sharded", "bin-views"])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--n-layer", type=int, default=3)
p.add_argument("--n-embd", type=int, default=64)
p.add_argument("--n-head", type=int, default=4)
p.add_argument("--rotary-dim", type=int, default=8)
p.add_argument("--n-inner", type=int, default=None)
p.add_argument("--prompts", default=None)
args = p.parse_args()

torch.manual_seed(args.seed)
config = GPTJConfig(
    vocab_size=50400,
    n_positions=2048,
    n_embd=args.n_embd,
    n_layer=args.n_layer,
    n_head=args.n_head,
    rotary_dim=args.rotary_dim,
    n_inner=args.n_inner,
    attn_pdrop=0.0,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    tie_word_embeddings=False,
)
model = GPTJForCausalLM(config).eval()
with torch.no_grad():
    for name, param in model.named_parameters():
        if "ln" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        elif name == "lm_head.weight":
            param.normal_(0.0, args.n_embd**-0.5)
        else:
            param.normal_(0.0, 0.05)

sharded = args.format.endswith("-sharded")
if args.format == "bin-views":
    # What hand-made checkpoints do: q/k/v as views into one fused storage, a transposed (non-contiguous)
    # out_proj, and the old key names without the "transformer." prefix.
    sd = {}
    for name, t in model.state_dict().items():
        sd[name.removeprefix("transformer.")] = t
    for i in range(args.n_layer):
        p = f"h.{i}.attn"
        fused = torch.cat([sd[f"{p}.q_proj.weight"], sd[f"{p}.k_proj.weight"], sd[f"{p}.v_proj.weight"]])
        sd[f"{p}.q_proj.weight"], sd[f"{p}.k_proj.weight"], sd[f"{p}.v_proj.weight"] = fused.split(args.n_embd)
        sd[f"{p}.out_proj.weight"] = sd[f"{p}.out_proj.weight"].t().contiguous().t()
    os.makedirs(args.out, exist_ok=True)
    torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))
    model.config.save_pretrained(args.out)
    sharded = False
else:
    model.save_pretrained(
        args.out,
        safe_serialization=args.format.startswith("safetensors"),
        max_shard_size="8MB" if sharded else "10GB",
    )
names = sorted(os.listdir(args.out))
index = [n for n in names if n.endswith(".index.json")]
assert bool(index) == sharded, names

if args.prompts:
    prompts = json.loads(args.prompts)
    # transformers reads back what it wrote; the hand-made layout is checked against the model it came from.
    logits = last_logits(model if args.format == "bin-views" else args.out, prompts)
    with open(os.path.join(args.out, "hf_logits.json"), "w") as f:
        json.dump(logits, f)
