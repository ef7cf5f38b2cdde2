"""Log-probabilities through the official `openai` SDK (run by tests/openai_logprobs.rs), checked against
transformers on the same checkpoint: the generated tokens' (completions and chat) and the prompt's, scored
with `echo` and `max_tokens: 0` as evaluation harnesses score a text's loglikelihood.

Usage: logprobs_client.py BASE MODEL MODEL_DIR. Exits non-zero, naming the check, on the first failure.
"""

import math
import sys

import openai
import torch
from transformers import AutoTokenizer, GPTJForCausalLM

BASE, MODEL, MODEL_DIR = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
hf = GPTJForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
TOLERANCE = 2e-4


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def reference(ids):
    """transformers' log-probability of each token given those before it (the first has none)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [None] + [log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1)]


def close(a, b):
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < TOLERANCE)


# A text's loglikelihood, as lm-evaluation-harness asks for it: echo the prompt, score it, generate nothing.
text = "The quick brown fox jumps over the lazy dog, and then it rests."
r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
lp = r.choices[0].logprobs
ids = tokenizer(text)["input_ids"]
theirs = reference(ids)
check(lp.tokens == [tokenizer.decode([i]) for i in ids], f"the echoed tokens are the prompt's: {lp.tokens}")
check(r.choices[0].text == text and r.usage.completion_tokens == 0, "max_tokens 0 generates nothing")
check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "the first prompt token has no logprob")
check(all(close(a, b) for a, b in zip(lp.token_logprobs, theirs)),
      f"prompt logprobs equal transformers': {lp.token_logprobs[:4]} vs {theirs[:4]}")
check(sum(lp.token_logprobs[1:]) < 0 and math.isfinite(sum(lp.token_logprobs[1:])), "a loglikelihood")
check(lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))], f"text offsets: {lp.text_offset}")

# Generated tokens, greedy: each is the likeliest (the first alternative), with transformers' logprob.
r = client.completions.create(model=MODEL, prompt=text, max_tokens=8, logprobs=3, temperature=0)
lp = r.choices[0].logprobs
check(len(lp.tokens) == r.usage.completion_tokens == 8, f"one logprob per generated token: {lp.tokens}")
check(all(len(top) == 3 for top in lp.top_logprobs), "three alternatives each")
check(all(max(top.values()) == logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs)),
      "greedy picks the likeliest token at every step")
generated = tokenizer(r.choices[0].text)["input_ids"]
full = reference(ids + generated)[len(ids):]
check(all(close(a, b) for a, b in zip(lp.token_logprobs, full)), "generated logprobs equal transformers'")

# Echo with generation: the prompt's scores, then the generated tokens'.
r = client.completions.create(model=MODEL, prompt=text, max_tokens=4, echo=True, logprobs=0, temperature=0)
lp = r.choices[0].logprobs
check(len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None, "echo scores prompt and continuation")

# Chat: OpenAI's content entries, with exact bytes; sampling reports the raw distribution.
r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                   logprobs=True, top_logprobs=2, temperature=0.8, seed=3)
content = r.choices[0].logprobs.content
check(len(content) == r.usage.completion_tokens, f"one entry per generated token: {len(content)}")
check(all(len(c.top_logprobs) == 2 and c.logprob <= 0 and c.bytes == list(c.token.encode()) or "\ufffd" in c.token
          for c in content), "entries carry token, logprob, bytes and two alternatives")

# Without asking, nothing: OpenAI's null.
r = client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0)
check(r.choices[0].logprobs is None, "no logprobs unless asked")

# Streaming does not carry them yet: refused by name, not silently dropped.
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                   logprobs=True, stream=True)
    check(False, "a streamed request with logprobs is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "logprobs", f"streamed logprobs are refused by name: {e.body}")

print("all logprobs checks passed")
