"""Structured output through unmodified clients (run by tests/structured_output.rs): the official `openai` SDK's
`chat.completions.parse` with Pydantic models and LangChain's `with_structured_output`, against a gateway and a
worker on the tiny random GPT-J. Its unconstrained output is noise, so only the constraint can make an answer
parse and validate; every one must, for schemas of many shapes.

Usage: structured_output.py BASE MODEL [MODEL_DIR]. Exits non-zero, naming the check, on the first failure.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, List, Literal, Optional, Union

import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# Strings, arrays and numbers are bounded: the random model would otherwise write a string (or digits) until
# max_tokens, and an answer cut short is not valid. The bounds are part of what is checked.
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)


class Name(BaseModel):
    name: str = Field(max_length=10)


class Age(BaseModel):
    age: int = Field(ge=0, le=120)


class Flag(BaseModel):
    ok: bool


class Paint(BaseModel):
    color: Color


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=4)


class Tags(BaseModel):
    tags: List[Literal["a", "b", "c"]] = Field(max_length=3)


class Located(BaseModel):
    point: Point


class Path(BaseModel):
    points: List[Point] = Field(max_length=2)


class Nickname(BaseModel):
    nickname: Optional[str] = Field(max_length=6)


class Either(BaseModel):
    value: Union[Literal["none"], Point]


class Mixed(BaseModel):
    label: str = Field(max_length=5)
    count: int = Field(ge=1, le=3)
    on: bool


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)
    pets: List[Pet] = Field(max_length=2)


class Ratio(BaseModel):
    # A float's fraction has no end of its own (a model may write 1.000… until max_tokens): a step bounds it.
    ratio: float = Field(ge=0, le=1, multiple_of=0.25)


class Matrix(BaseModel):
    rows: List[Annotated[List[Literal[0, 1]], Field(max_length=3)]] = Field(max_length=2)


class Deep(BaseModel):
    a: Located
    b: Optional[Flag]


class Colors(BaseModel):
    colors: List[Color] = Field(min_length=1, max_length=3)


class Code(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")


class Vote(BaseModel):
    choice: Literal["yes", "no"]
    weight: int = Field(ge=1, le=5)
    comment: Optional[str] = Field(max_length=4)


class Reading(BaseModel):
    sensor: Literal["t1", "t2"]
    celsius: int = Field(ge=-40, le=60)
    ok: bool
    at: Point


MODELS = [Name, Age, Flag, Paint, Pet, Tags, Located, Path, Nickname, Either, Mixed, Person, Ratio, Matrix,
          Deep, Colors, Code, Vote, Reading, Point]


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

print("all structured output checks passed")
