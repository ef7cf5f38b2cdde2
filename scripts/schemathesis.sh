#!/usr/bin/env bash
# Fuzzes the gateway's own OpenAPI document with schemathesis (pinned in the venv), every operation, against a
# real gateway and a worker on the tiny model, on the machine's Redis and RabbitMQ, in a namespace of its own
# (deleted at the end). scripts/test.sh runs it; run alone: scripts/schemathesis.sh [extra schemathesis flags].
#
# Every check runs, with these exceptions (the settings, each with its reason, are in the configuration
# written below):
# - use_after_free is off: DELETE /v1/jobs/{id} cancels a job, which stays readable as `cancelled`, as it
#   must;
# - positive_data_acceptance (a request the schema allows must not be refused) lets through, on the four
#   operations that take a job and on POST /v1/batches, and only there, the refusals listed in EXCUSED: each
#   by its error code and message, with why the schema cannot state the rule. Any other refusal of a schema-valid request fails;
# - not_a_server_error takes a 504 from the three operations that wait for their jobs (their documented
#   timeout), and negative_data_rejection a 413 from the four that take a body (the body limit).
# Knobs: EXAMPLES (25 per operation), SEED (a fixed seed: runs are reproducible), BIN (target/debug).
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT" || exit
ensure_venv
ensure_services

BIN="${BIN:-$ROOT/target/debug}"
EXAMPLES="${EXAMPLES:-25}"
SEED="${SEED:-20261201}"
NS="st$$"
PORT="${PORT:-18095}"
LOGS="$ROOT/target/schemathesis"
mkdir -p "$LOGS"
[ -x "$BIN/gateway" ] && [ -x "$BIN/worker" ] || cargo build --locked -p gateway -p worker
MODEL="$ROOT/target/schemathesis/tiny"
[ -f "$MODEL/config.json" ] || "$BIN/worker" init-tiny-model "$MODEL" --seed 0 >/dev/null

PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  delete_namespace "$NS"
}
trap cleanup EXIT

export NAMESPACE="$NS"
LISTEN="127.0.0.1:$PORT" SUBMIT_RATE_LIMIT=100000/1s READ_RATE_LIMIT=100000/1s TOKEN_RATE_LIMIT=1000000000/1s MAX_ACTIVE_JOBS_PER_CLIENT=0 RUN_TIMEOUT_S=5 \
  FILES_DIR="$LOGS/files" "$BIN/gateway" >"$LOGS/gateway.log" 2>&1 &
PIDS+=("$!")
MODEL_DIR="$MODEL" THREADS=1 "$BIN/worker" serve >"$LOGS/worker.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$PORT/v1/queue" 2>/dev/null | grep -q '"consumers":1' && break
  sleep 0.2
done

# Every check is on unless this configuration says otherwise; a check named on the command line would
# override its per-operation settings. Schemathesis's cache goes with the logs, not into the work tree.
cat >"$LOGS/schemathesis.toml" <<TOML
[cache]
directory = "$LOGS/cache"

[checks.use_after_free]
enabled = false

# The operations that take a job: the built-in positive_data_acceptance gives way to the same check less
# EXCUSED's refusals (positive_data_acceptance_but_excused, below). A schema-violating body (65 messages,
# say) may also be over the body limit, which 413 answers before the content is read: a refusal, as
# negative_data_rejection wants, by another status.
[[operations]]
include-name = ["POST /v1/jobs", "POST /run", "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/batches"]
checks.positive_data_acceptance.enabled = false
checks.negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]

# The operations that wait for their jobs answer 504 (documented: the jobs go on) when generation outlasts
# RUN_TIMEOUT_S, as up to 8 choices of up to 2048 tokens on one CPU worker can; a 504 here is that, not a
# failure of the server. Every other 5xx still fails the run.
[[operations]]
include-name = ["POST /run", "POST /v1/completions", "POST /v1/chat/completions"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
TOML
# The replacement, loaded as a schemathesis hook. A refusal is excused only when the operation lists its
# error code and its message matches the pattern; the reasons are why the schema cannot say it.
cat >"$LOGS/excused.py" <<'PY'
import json
import re

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

AS_WRITTEN = [
    # A prompt taken as written (the OpenAI routes, /v1/jobs) loses only its control characters other than
    # tab, newline and carriage return: "" or "\u0000" is schema-valid text with nothing left. JSON Schema can
    # bound a string's length, not the length of what it becomes.
    ("prompt_empty", r"", "a prompt with nothing left once its control characters are removed"),
    # The prompt's tokens plus max_new_tokens must fit the model's context: it takes the tokenizer (and, for
    # a conversation, the worker's chat template).
    ("context_overflow", r"", "a prompt whose tokens and max_new_tokens overflow the context"),
]
CLEANED = AS_WRITTEN + [
    # /run cleans a prompt as the original did, characters outside the allowed set removed and whitespace
    # collapsed, before its length limits apply: "$$$" is schema-valid text that cleans to nothing.
    ("prompt_too_short", r"", "a prompt shorter than the minimum once cleaned"),
    ("prompt_too_long", r"", "a prompt longer than the maximum once cleaned"),
]
INTEGRAL = [
    # JSON Schema's `integer` is any number with no fraction, 1.0 included; serde reads only 1 into an
    # integer field. No schema tells the two spellings apart.
    ("invalid_parameter", r"invalid type: floating point `[^`]*`, expected u(32|64)", "1.0 for an integer"),
]
STRATEGY = [
    # A parameter only one decoding strategy reads is refused with another, so a client learns that its
    # `temperature` did nothing; which parameters are allowed depends on the value of `strategy`.
    ("invalid_parameter", r"applies only to strategy", "a parameter the chosen strategy does not use"),
    ("invalid_parameter", r"conflicts with strategy", "do_sample true with a strategy other than sample"),
    ("invalid_parameter", r"for contrastive search", "top_k beyond 64 with contrastive search"),
    ("invalid_parameter", r"`temperature`: must be in \(0,", "temperature 0 (greedy) with strategy sample"),
    # A bound that is another field's value.
    # (Named in OpenAI's terms on its routes: min_tokens above max_tokens.)
    ("invalid_parameter", r"must not exceed max_(new_)?tokens", "min_new_tokens above max_new_tokens"),
]
GRAMMAR = [
    # A grammar (a JSON Schema, a regular expression, a Lark grammar) is refused when it does not compile:
    # only compiling it against the vocabulary tells, and a random string is rarely a valid pattern.
    ("invalid_parameter", r"^invalid `(grammar|response_format|structured_outputs|guided_[a-z]+)`",
     "a grammar that does not compile"),
    # Relations of two fields: one constraint at most; a grammar decides where the text ends, so it cannot
    # be combined with a minimum length; alternatives come with logprobs.
    ("invalid_parameter", r"constrains the text a second time", "two constraints"),
    ("invalid_parameter", r"cannot be combined with a grammar", "min_new_tokens with a grammar"),
    ("invalid_parameter", r"needs `logprobs: true`", "top_logprobs without logprobs"),
    # Log-probabilities are reported for greedy decoding and sampling: a rule on the value of `strategy`.
    ("invalid_parameter", r"is given for greedy decoding and sampling", "logprobs with contrastive or beam"),
]
EXCUSED = {
    "POST /v1/jobs": AS_WRITTEN + INTEGRAL + STRATEGY + GRAMMAR + [
        # What a key may be reused for depends on the requests before this one.
        ("idempotency_key_reused", r"", "an Idempotency-Key an earlier request used with another body"),
        ("invalid_parameter", r"has a `prompt` or `messages`, not both",
         "a prompt and messages together: a relation of two fields, which utoipa's derive cannot write"),
        # Every generation parameter's range is in the schema (shared/src/params.rs, beside the validation);
        # one lower bound is another field's value: 0 new tokens only when the prompt is scored.
        ("invalid_parameter", r"`max_new_tokens`: must be in \[1,", "max_new_tokens 0 without prompt_logprobs"),
    ],
    "POST /run": CLEANED + INTEGRAL,
    "POST /v1/completions": AS_WRITTEN + INTEGRAL + STRATEGY + GRAMMAR + [
        ("invalid_parameter", r"prompts times n", "more prompts times n than 8 choices: a product of two fields"),
    ],
    "POST /v1/batches": [
        # A batch runs an uploaded file: a schema-valid `input_file_id` names a file only when an earlier
        # `POST /v1/files` of the same key made it, which no schema can say.
        ("not_found", r"^no such file", "an input_file_id that names no file of this key"),
        # OpenAI's bound on metadata (16 pairs); utoipa's derive writes no maxProperties.
        ("invalid_parameter", r"^invalid `metadata`", "more than 16 metadata pairs"),
    ],
    "POST /v1/chat/completions": AS_WRITTEN + INTEGRAL + STRATEGY + GRAMMAR + [
        ("invalid_parameter", r"but max_tokens is", "max_tokens and max_completion_tokens that disagree"),
        # Tool calls are forced (the model cannot decide whether to call): `tool_choice` must fit `tools`,
        # a relation of two fields. Tools given without a forced choice mean OpenAI's `auto`, which is
        # refused; a forced call needs tools, and a name among theirs; a forced call's arguments are the
        # text's one constraint.
        ("invalid_parameter", r"^invalid `tool_choice`", "a tool choice that does not fit the tools"),
        # Function names are unique within `tools`: JSON Schema's uniqueItems compares whole items.
        ("invalid_parameter", r"^invalid `tools`: declares `[^`]*` twice", "two tools of one name"),
        # A tool's `parameters` is a JSON Schema the grammar compiles (as response_format's).
        ("invalid_parameter", r"^invalid `tools`", "a tool's parameters schema that does not compile"),
    ],
}


def refusal(response):
    """The error code and message of a refusal, in the gateway's shape or OpenAI's."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None, ""
    error = body.get("error", body) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    return error.get("code"), error.get("message") or ""


@schemathesis.check
def positive_data_acceptance_but_excused(ctx, response, case):
    """positive_data_acceptance, less the refusals EXCUSED lists for this operation."""
    excused = EXCUSED.get(case.operation.label)
    if excused is None:
        return None  # The built-in check covers this operation.
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        code, message = refusal(response)
        if not any(code == c and re.search(p, message) for c, p, _ in excused):
            raise
        return None
PY
log "schemathesis on http://127.0.0.1:$PORT/openapi.json ($EXAMPLES examples per operation, seed $SEED)"
set +e
SCHEMATHESIS_HOOKS="$LOGS/excused.py" "$VENV/bin/schemathesis" --config-file "$LOGS/schemathesis.toml" \
  run "http://127.0.0.1:$PORT/openapi.json" \
  --max-examples "$EXAMPLES" --seed "$SEED" --request-timeout 30 --workers 2 \
  --suppress-health-check all "$@" >"$LOGS/report.txt" 2>&1
status=$?
set -e
# The report without the tool's own tracebacks, which quote whole source files.
grep -v "^    KeyError: ('" "$LOGS/report.txt" | tail -n 40
# A failure of the API fails this script. So does any error but one: CPython 3.11 raises "AST constructor
# recursion depth mismatch" inside Hypothesis while it describes a strategy's lambda (a bug of the tool's,
# not a request the API answered); it stops that operation's coverage phase, its fuzzing and stateful phases
# still run, and the report names the operation.
if grep -q "^Failures:" "$LOGS/report.txt"; then
  echo "schemathesis found failures; the report: $LOGS/report.txt" >&2
  exit 1
fi
# Each error section of the report, and those that are not the tool's own.
read -r errors other < <("$VENV/bin/python" - "$LOGS/report.txt" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
block = text.split("= ERRORS =", 1)[1] if "= ERRORS =" in text else ""
block = re.split(r"\n=+ (?:FAILURES|WARNINGS|SUMMARY) =+\n", block)[0]
sections = [s for s in re.split(r"\n_{5,} [^\n]* _{5,}\n", block)[1:] if s.strip()]
other = [s for s in sections if "AST constructor recursion depth mismatch" not in s]
print(len(sections), len(other))
PY
)
if [ "$status" -ne 0 ] && { [ "$other" -gt 0 ] || [ "$errors" -eq 0 ]; }; then
  echo "schemathesis could not test every operation ($errors errors, $other not the tool's own); the report: $LOGS/report.txt" >&2
  exit 1
fi
tool="$errors"
log "schemathesis: no failures; $tool error(s), each the tool's own (that operation's coverage phase stopped)"
