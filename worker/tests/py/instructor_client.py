"""instructor, unmodified, against a gateway and a worker on the tiny random GPT-J (run by
tests/structured_output.rs, with the interpreter of instructor's own venv: its pins exclude the openai SDK of
the main one). Its default mode forces a tool call of the response model's function; its strict mode marks
the tool strict. The random model's unconstrained text is noise, so only the constraint makes each answer
validate, for the 20 schemas of tests/py/schemas.py, greedy and sampled, with no retry.

Usage: instructor_client.py BASE MODEL [MODEL_DIR]. Exits non-zero, naming the check, on the first failure.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import instructor
import openai

from schemas import MODELS

BASE, MODEL = sys.argv[1], sys.argv[2]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def ask(mode, model, greedy):
    client = instructor.from_openai(openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0,
                                                  timeout=300), mode=mode)
    extra = {"temperature": 0} if greedy else {"temperature": 1.0, "seed": 11}
    # max_retries=0: a first answer that did not validate would fail here instead of being asked again.
    return client.chat.completions.create(model=MODEL, response_model=model, max_retries=0, max_tokens=400,
                                          messages=[{"role": "user", "content": f"Give a {model.__name__}."}],
                                          **extra)


cases = [(mode, m, g) for mode in (instructor.Mode.TOOLS, instructor.Mode.TOOLS_STRICT) for m in MODELS
         for g in (True, False)]
with ThreadPoolExecutor(max_workers=8) as pool:
    answers = list(pool.map(lambda args: (args, ask(*args)), cases))
for (mode, model, greedy), out in answers:
    check(isinstance(out, model), f"instructor {mode.name} {model.__name__} ({'greedy' if greedy else 'sampled'}): "
                                  f"{out!r}")
check(len(answers) == 4 * len(MODELS) and len(MODELS) >= 20, f"{len(MODELS)} schemas, two modes, greedy and sampled")
print("all instructor checks passed")
