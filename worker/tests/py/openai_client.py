"""The official `openai` Python SDK against two gateway replicas sharing one broker (run by tests/openai_sdk.rs).

Usage: openai_client.py BASE_A BASE_B MODEL. Exits non-zero, naming the check, on the first failure.
"""

import json
import sys
import time
import urllib.request

import openai

BASE_A, BASE_B, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
a = openai.OpenAI(base_url=f"{BASE_A}/v1", api_key="unused", max_retries=0, timeout=60)
b = openai.OpenAI(base_url=f"{BASE_B}/v1", api_key="unused", max_retries=0, timeout=60)
PROMPT = "The capital of France is"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def job_text(base, prompt, parameters):
    """The text /v1/jobs gives for the same prompt and parameters."""
    job = http("POST", f"{base}/v1/jobs", {"prompt": prompt, "parameters": parameters})
    deadline = time.time() + 60
    while time.time() < deadline:
        view = http("GET", f"{base}/v1/jobs/{job['id']}")
        if view["status"] in ("succeeded", "failed", "cancelled"):
            check(view["status"] == "succeeded", f"the /v1/jobs job succeeds: {view}")
            return view["result"]["text"]
        time.sleep(0.05)
    check(False, "the /v1/jobs job finished in time")


# The model list, from either replica.
for client in (a, b):
    models = client.models.list()
    check([m.id for m in models.data] == [MODEL], f"models.list() names the served model: {models}")

# Completions, not streamed: greedy (temperature 0) equals the job API's greedy text.
done = a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
check(done.object == "text_completion" and len(done.choices) == 1, "a completion has one choice")
choice = done.choices[0]
check(choice.finish_reason in ("length", "stop"), f"finish_reason is stop or length: {choice.finish_reason}")
check(done.usage is not None and done.usage.prompt_tokens == 5, f"usage counts the prompt's 5 tokens: {done.usage}")
check(done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens, "usage adds up")
check(1 <= done.usage.completion_tokens <= 12, "completion tokens within max_tokens")
greedy = job_text(BASE_B, PROMPT, {"strategy": "greedy", "max_new_tokens": 12})
check(choice.text == greedy, f"greedy /v1/completions text equals /v1/jobs' ({choice.text!r} vs {greedy!r})")

# Streamed, from the other replica: the same text, then a usage chunk.
chunks = list(
    b.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
)
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
check(streamed == choice.text, f"streamed text equals the non-streamed text ({streamed!r})")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens,
      f"the last chunk carries the usage: {chunks[-1]}")
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finishes == [choice.finish_reason], f"one finish_reason, at the end: {finishes}")

# Chat, not streamed and streamed.
messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
chat = a.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
check(chat.object == "chat.completion" and chat.choices[0].message.role == "assistant", "a chat completion")
check(chat.usage is not None and chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0,
      f"chat usage: {chat.usage}")
stream = b.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
)
parts, roles, usage = [], [], None
for c in stream:
    if c.usage is not None:
        usage = c.usage
    for ch in c.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            parts.append(ch.delta.content)
check(roles == ["assistant"], f"the role comes once, first: {roles}")
check("".join(parts) == chat.choices[0].message.content, "streamed chat text equals the non-streamed text")
check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, f"streamed chat usage: {usage}")

# n choices of seeded sampling, reproducible; our own parameters as extra fields.
two = a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2)
check(sorted(c.index for c in two.choices) == [0, 1], "n=2 gives two choices")
again = b.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2)
check([c.text for c in two.choices] == [c.text for c in again.choices], "seeded choices reproduce")
contrastive = a.completions.create(
    model=MODEL, prompt=PROMPT, max_tokens=6, extra_body={"strategy": "contrastive", "penalty_alpha": 0.6, "top_k": 4}
)
check(contrastive.choices[0].text == job_text(
    BASE_A, PROMPT, {"strategy": "contrastive", "penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 6}),
    "extra fields select our strategies")

# The model by its id (client.models.retrieve); an unknown one is 404 in OpenAI's shape.
model = b.models.retrieve(MODEL)
check(model.id == MODEL and model.object == "model", f"models.retrieve() gives the served model: {model}")
try:
    a.models.retrieve("no-such-model")
    check(False, "an unknown model cannot be retrieved")
except openai.NotFoundError as e:
    check(e.body.get("code") == "model_not_found", f"unknown model retrieved: {e.body}")

# What the SDK sends that changes nothing here is accepted and ignored: the same greedy text.
ignored = a.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=10, temperature=0, user="user-1", metadata={"run": "ci"},
    store=False, service_tier="auto", parallel_tool_calls=False, reasoning_effort="low",
    safety_identifier="hash", prompt_cache_key="session",
)
check(ignored.choices[0].message.content == chat.choices[0].message.content,
      "bookkeeping fields are accepted and change nothing")

# vLLM's extras, as clients written for vLLM send them: ignore_eos generates every token asked, min_p samples.
through = a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                               extra_body={"ignore_eos": True})
check(through.usage.completion_tokens == 16 and through.choices[0].finish_reason == "length",
      f"ignore_eos runs to max_tokens: {through.usage}")
sampled = a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, seed=3, extra_body={"min_p": 0.05})
check(sampled.usage.completion_tokens >= 1, f"min_p sampling: {sampled.usage}")

# /health, where load testers look first.
check(http("GET", f"{BASE_A}/health")["ready"] is True, "/health answers ready")

# Errors in OpenAI's shape.
try:
    a.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.body.get("code") == "model_not_found" and e.body.get("param") == "model", f"unknown model: {e.body}")
try:
    a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=-1)
    check(False, "a negative temperature is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "temperature" and e.body.get("type") == "invalid_request_error",
          f"bad temperature: {e.body}")
try:
    a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, best_of=2)
    check(False, "best_of above 1 is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "best_of", f"best_of: {e.body}")
try:
    a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    check(False, "max_tokens past its bound is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "max_tokens" and "max_new_tokens" not in e.body.get("message", ""),
          f"the error names OpenAI's field: {e.body}")
print("all openai SDK checks passed")
