"""Structured output through unmodified clients (run by tests/structured_output.rs): the official `openai` SDK's
`chat.completions.parse` with Pydantic models (as `response_format` and as forced tool calls) and LangChain's
`with_structured_output` (JSON Schema and function calling), against a gateway and a worker on the tiny random
GPT-J. Its unconstrained output is noise, so only the constraint can make an answer
parse and validate; every one must, for schemas of many shapes.

Usage: structured_output.py BASE MODEL [MODEL_DIR]. Exits non-zero, naming the check, on the first failure.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from langchain_openai import ChatOpenAI

from schemas import MODELS, Person, Pet, Reading, Vote

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def parse(model, greedy):
    extra = {"temperature": 0} if greedy else {"temperature": 1.0, "seed": 5}
    try:
        r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": f"Give a {model.__name__}."}],
                                          response_format=model, max_tokens=400, **extra)
    except openai.LengthFinishReasonError as e:
        return model, greedy, "length", e.completion.choices[0].message.content, None
    choice = r.choices[0]
    return model, greedy, choice.finish_reason, choice.message.content, choice.message.parsed


with ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(lambda args: parse(*args), [(m, g) for m in MODELS for g in (True, False)]))
for model, greedy, finish, content, parsed in results:
    if finish != "stop":
        print(f"LENGTH {model.__name__} greedy={greedy}: {content[:300]!r}")
for model, greedy, finish, content, parsed in results:
    mode = "greedy" if greedy else "sampled"
    check(finish == "stop", f"{model.__name__} ({mode}) ends because its schema is complete: {finish} {content!r}")
    check(isinstance(parsed, model), f"{model.__name__} ({mode}) parses and validates: {content!r}")
    # Validation by Pydantic again, from the raw text, so nothing the SDK does could hide a bad answer.
    model.model_validate_json(content)
check(len(results) == 2 * len(MODELS) and len(MODELS) >= 20, f"{len(MODELS)} schemas, greedy and sampled")

# json_object mode: any JSON object; the random model's keys are unbounded, so only its start is checked
# when it runs out of tokens, and a finished one must parse.
r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                   response_format={"type": "json_object"}, max_tokens=30, temperature=0)
text = r.choices[0].message.content
if r.choices[0].finish_reason == "stop":
    check(isinstance(json.loads(text), dict), f"json_object mode gives an object: {text!r}")
else:
    check(text.startswith("{"), f"json_object mode starts an object: {text!r}")

# vLLM's extra fields, through the SDK's extra_body, on completions.
r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=20, temperature=0,
                              extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
check(r.choices[0].text in ("alpha", "beta", "gamma"), f"structured_outputs.choice: {r.choices[0].text!r}")
r = client.completions.create(model=MODEL, prompt="A phone number:", max_tokens=30, temperature=0,
                              extra_body={"guided_regex": r"\d{3}-\d{4}"})
check(len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-", f"guided_regex: {r.choices[0].text!r}")

# Streaming: the chunks put together are the constrained text.
stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A pet"}],
                                        response_format={"type": "json_schema", "json_schema": {
                                            "name": "pet", "strict": True,
                                            "schema": openai.lib._pydantic.to_strict_json_schema(Pet)}},
                                        max_tokens=60, temperature=0, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
Pet.model_validate_json(streamed)
check(True, f"a streamed answer validates: {streamed!r}")

# A schema that cannot compile is refused before it is queued, by name.
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "bad", "schema": {"type": "object", "properties": {
                                           "a": {"$ref": "#/$defs/missing"}}}}})
    check(False, "a broken schema is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body.get("param") == "response_format", f"a broken schema is a 400: {e.body}")

# LangChain, unmodified: with_structured_output over the OpenAI-compatible API.
llm = ChatOpenAI(base_url=f"{BASE}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=300,
                 max_retries=0, timeout=300)
for model in (Person, Vote, Reading):
    out = llm.with_structured_output(model, method="json_schema").invoke(f"Give a {model.__name__}.")
    check(isinstance(out, model), f"LangChain with_structured_output({model.__name__}): {out!r}")

# Tool calling, forced: the SDK's own function tools from Pydantic models, named by `tool_choice`; the call's
# arguments parse into the model (the SDK parses strict tools itself).
def call(model, greedy):
    extra = {"temperature": 0} if greedy else {"temperature": 1.0, "seed": 9}
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": f"Call {model.__name__}."}],
                                      tools=[openai.pydantic_function_tool(model)],
                                      tool_choice={"type": "function", "function": {"name": model.__name__}},
                                      max_tokens=400, **extra)
    return model, greedy, r.choices[0]


with ThreadPoolExecutor(max_workers=8) as pool:
    calls = list(pool.map(lambda args: call(*args), [(m, g) for m in MODELS for g in (True, False)]))
for model, greedy, choice in calls:
    mode = "greedy" if greedy else "sampled"
    what = f"a forced call of {model.__name__} ({mode})"
    check(choice.finish_reason == "stop" and choice.message.content is None, f"{what} ends as OpenAI's: {choice}")
    (tool_call,) = choice.message.tool_calls
    check(tool_call.type == "function" and tool_call.id.startswith("call_")
          and tool_call.function.name == model.__name__, f"{what} names its function: {tool_call}")
    check(isinstance(tool_call.function.parsed_arguments, model), f"{what} parses: {tool_call.function.arguments!r}")
    model.model_validate_json(tool_call.function.arguments)

# `required`: a call of any of the tools, which the answer names.
tools = [openai.pydantic_function_tool(m) for m in (Pet, Vote, Reading)]
by_name = {m.__name__: m for m in (Pet, Vote, Reading)}
for seed in range(3):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Call something."}],
                                       tools=tools, tool_choice="required", max_tokens=400, temperature=1.0,
                                       seed=seed)
    choice = r.choices[0]
    (tool_call,) = choice.message.tool_calls
    check(choice.finish_reason == "tool_calls" and tool_call.function.name in by_name,
          f"a required call names a declared tool: {choice}")
    by_name[tool_call.function.name].model_validate_json(tool_call.function.arguments)

# Streamed: the first piece names the function, the pieces of arguments put together parse.
stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A vote"}],
                                        tools=[openai.pydantic_function_tool(Vote)],
                                        tool_choice={"type": "function", "function": {"name": "Vote"}},
                                        max_tokens=200, temperature=0, stream=True)
pieces = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
check(pieces and pieces[0].function.name == "Vote" and pieces[0].id.startswith("call_"),
      f"a streamed call's first piece names it: {pieces[:1]}")
Vote.model_validate_json("".join(p.function.arguments or "" for p in pieces))
check(True, "a streamed call's arguments put together validate")

# A conversation that carries the call and the tool's answer goes on.
history = [{"role": "user", "content": "Vote."},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": tool_call.id, "type": "function", "function": {"name": "Vote", "arguments": '{"choice":"yes"}'}}]},
           {"role": "tool", "tool_call_id": tool_call.id, "content": "counted"}]
r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, temperature=0)
check(r.choices[0].message.content is not None, f"a conversation with a tool call and its result is answered: {r}")

# `auto` is refused by name: the model cannot decide whether to call.
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5, tools=tools)
    check(False, "tools without a forced tool_choice are refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "tool_choice", f"tool_choice auto is a 400 naming it: {e.body}")

# A tool whose schema cannot compile is refused before it is queued, naming `tools`.
broken = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                   tools=broken, tool_choice={"type": "function", "function": {"name": "f"}})
    check(False, "a tool with a broken schema is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "tools" and "missing" in e.body.get("message", ""),
          f"a tool with a broken schema is a 400 naming tools: {e.body}")

# LangChain's function calling forces the call the same way.
for model in (Person, Vote, Reading):
    out = llm.with_structured_output(model, method="function_calling", include_raw=True).invoke(
        f"Give a {model.__name__}.")
    check(isinstance(out["parsed"], model),
          f"LangChain with_structured_output({model.__name__}, function_calling): {out!r}")

print("all structured output checks passed")
