"""transformers' `generate` as the reference for the worker's decoding (transformers 4.55.4).

    python hf_generate.py MODEL_DIR < cases.json > results.json
        cases.json: [{"prompt": [ids], "kwargs": {...generate kwargs...}}, ...]
        results.json: [[new ids], ...]  (what generate returned after the prompt)
    python hf_generate.py MODEL_DIR --eos-bias X --save-to OUT_DIR
        copies the model with X added to the head's bias for EOS (a model that likes to stop)
    python hf_generate.py MODEL_DIR --bench PROMPT_TEXT --threads N [--dtype float32|bfloat16]
        --max-new-tokens N --strategy greedy|contrastive [--repeat N]
        times `generate` (exactly N new tokens, after a warm-up; the fastest of the repeats) and prints
        {"tokens_per_s", "seconds", "new_tokens"}; the prompt is tokenized with MODEL_DIR/tokenizer.json

Every prompt runs alone (batch of one, no padding), float32, on the CPU.
"""

import argparse
import json
import sys
import time

import torch
from transformers import GPTJForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--eos-bias", type=float)
p.add_argument("--save-to")
p.add_argument("--bench")
p.add_argument("--threads", type=int)
p.add_argument("--dtype", default="float32")
p.add_argument("--max-new-tokens", type=int, default=50)
p.add_argument("--strategy", default="greedy")
p.add_argument("--repeat", type=int, default=3)
args = p.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
model = GPTJForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval()
eos = model.config.eos_token_id

if args.eos_bias is not None:
    with torch.no_grad():
        model.lm_head.bias[eos] += args.eos_bias
    model.save_pretrained(args.save_to, safe_serialization=True)
    sys.exit(0)

if args.bench:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    ids = torch.tensor([tok.encode(args.bench, add_special_tokens=False).ids])
    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
                  pad_token_id=eos)
    if args.strategy == "contrastive":
        kwargs.update(penalty_alpha=0.6, top_k=4)
    best = None
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), **dict(kwargs, max_new_tokens=3, min_new_tokens=3))
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            took = time.perf_counter() - start
            best = took if best is None else min(best, took)
    new = out.shape[1] - ids.shape[1]
    print(json.dumps({"tokens_per_s": new / best, "seconds": best, "new_tokens": new}))
    sys.exit(0)

cases = json.load(sys.stdin)
results = []
with torch.no_grad():
    for case in cases:
        ids = torch.tensor([case["prompt"]])
        kwargs = dict(pad_token_id=eos, do_sample=False)
        kwargs.update(case["kwargs"])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        results.append(out[0, ids.shape[1]:].tolist())
json.dump(results, sys.stdout)
