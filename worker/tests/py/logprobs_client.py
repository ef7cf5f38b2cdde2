"""Log-probabilities through the official `openai` SDK (run by tests/openai_logprobs.rs), checked against
transformers on the same checkpoint: the generated tokens' (completions and chat) and the prompt's, scored
with `echo` and `max_tokens: 0` as evaluation harnesses score a text's loglikelihood. Streamed, the chunks'
log-probabilities put together are exactly the whole answer's.

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
scored_prompt = r
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

# Streamed (the worker sends a chunk every 2 tokens): each chunk carries its tokens' log-probabilities, which
# put together are exactly those of the same request unstreamed (greedy: the same tokens), one per generated
# token; the last chunk, which says why the choice ended, repeats none.
FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def stream(create, **request):
    return list(create(model=MODEL, stream=True, stream_options={"include_usage": True}, **request))


def pieces(chunks):
    """Each choice piece of the chunks, in order (the usage chunk has none)."""
    return [choice for chunk in chunks for choice in chunk.choices]


def fields(lp):
    """A completion's logprobs as a dict of its parallel lists."""
    return {field: getattr(lp, field) for field in FIELDS}


def joined(chunks):
    """A completion stream's text, the chunks' logprobs, and those put together as one answer has them."""
    scored = [p.logprobs for p in pieces(chunks) if p.logprobs is not None]
    return ("".join(p.text for p in pieces(chunks)), scored,
            {field: [x for lp in scored for x in getattr(lp, field)] for field in FIELDS})


# A stop sequence from the middle of the answer makes the stream hold text back while its tokens go out.
plain = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0).choices[0].text
for stop in [None, plain[len(plain) // 2:][:3] or None]:
    request = dict(prompt=text, max_tokens=12, logprobs=3, temperature=0, **({"stop": stop} if stop else {}))
    whole = client.completions.create(model=MODEL, **request)
    chunks = stream(client.completions.create, **request)
    streamed_text, scored, streamed = joined(chunks)
    check(streamed_text == whole.choices[0].text, f"stop={stop!r}: the streamed text is the answer's")
    answer = fields(whole.choices[0].logprobs)
    differ = {field: (streamed[field], answer[field]) for field in answer if streamed[field] != answer[field]}
    check(not differ, f"stop={stop!r}: the chunks' logprobs put together are the answer's {differ or ''}")
    check(len(streamed["tokens"]) == chunks[-1].usage.completion_tokens,
          f"stop={stop!r}: one logprob per generated token")
    last = [p for p in pieces(chunks) if p.finish_reason]
    check(len(last) == 1 and last[0].logprobs is None, f"stop={stop!r}: the last chunk repeats none")

# Chat: the chunks' content entries put together are the answer's (the role chunk and the last carry none).
request = dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12, logprobs=True,
               top_logprobs=2, temperature=0)
whole = client.chat.completions.create(model=MODEL, **request)
chunks = stream(client.chat.completions.create, **request)
entries = [e.model_dump() for p in pieces(chunks) if p.logprobs is not None for e in p.logprobs.content]
check(entries == [e.model_dump() for e in whole.choices[0].logprobs.content],
      f"chat: the chunks' logprobs put together are the unstreamed answer's ({len(entries)} entries)")
check(len(entries) == chunks[-1].usage.completion_tokens, "chat: one entry per generated token")
role = pieces(chunks)[0]
check(role.delta.role == "assistant" and role.logprobs is None, "chat: the role chunk has none")
check([p.logprobs for p in pieces(chunks) if p.finish_reason] == [None], "chat: the last chunk repeats none")

# Echo, streamed: scoring a prompt alone (`max_tokens` 0), the echoed prompt carries its scores; with
# generation, the prompt's scores come only with the result, so the echo chunk has none and the generated
# tokens' offsets run on from the prompt's characters (docs/openai.md).
chunks = stream(client.completions.create, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
streamed_text, _, streamed = joined(chunks)
check(streamed_text == text and streamed == fields(scored_prompt.choices[0].logprobs),
      "echo streamed with max_tokens 0: the prompt's scores, as unstreamed")
request = dict(prompt=text, max_tokens=4, echo=True, logprobs=0, temperature=0)
whole = client.completions.create(model=MODEL, **request).choices[0].logprobs
chunks = stream(client.completions.create, **request)
streamed_text, _, streamed = joined(chunks)
echo = pieces(chunks)[0]
check(echo.text == text and echo.logprobs is None, "echo streamed: the prompt first, without its scores")
check(streamed == {field: values[len(ids):] for field, values in fields(whole).items()},
      "echo streamed: the generated tokens' logprobs and offsets, as unstreamed")

print("all logprobs checks passed")
