"""transformers' reference log-probabilities for a GPT-J checkpoint directory.

    python hf_logprobs.py MODEL_DIR '[[ids], ...]' TOP OUT.json

writes, for each sequence run alone in one pass, every position's log-softmax of GPTJForCausalLM's logits at
the sequence's next token, and the TOP likeliest tokens there: `[[{"logprob", "top": [[id, logprob], ...]}, ...]]`
(one entry per token from the second on).
"""

import json
import sys

import torch
from transformers import GPTJForCausalLM

model_dir, sequences, top, out_path = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = GPTJForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
out = []
with torch.no_grad():
    for ids in sequences:
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        rows = []
        for t in range(len(ids) - 1):
            values, indices = log_probs[t].topk(top)
            rows.append({"logprob": log_probs[t, ids[t + 1]].item(),
                         "top": [[i.item(), v.item()] for i, v in zip(indices, values)]})
        out.append(rows)
with open(out_path, "w") as f:
    json.dump(out, f)
