"""transformers' reference logits for a GPT-J checkpoint directory.

    python hf_logits.py MODEL_DIR '[[ids], ...]' OUT.json [--dtype float32]

writes, for each prompt run alone, GPTJForCausalLM's logits at the last position (a list of floats each).
"""

import json
import sys

import torch
from transformers import GPTJForCausalLM


def last_logits(model_or_dir, prompts, dtype=torch.float32):
    if isinstance(model_or_dir, str):
        model = GPTJForCausalLM.from_pretrained(model_or_dir, torch_dtype=dtype).eval()
    else:
        model = model_or_dir
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1]
            out.append(logits.float().tolist())
    return out


if __name__ == "__main__":
    model_dir, prompts, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--dtype" else torch.float32
    with open(out_path, "w") as f:
        json.dump(last_logits(model_dir, prompts, dtype), f)
