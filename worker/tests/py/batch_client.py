"""The Batch API as its users meet it: the official `openai` Python SDK, unmodified (run by tests/batch_api.rs).

Usage: batch_client.py BASE MODEL MODEL_DIR KEY OTHER_KEY. The gateway takes the API keys KEY and OTHER_KEY.
Exits non-zero, naming the check, on the first failure.
"""

import io
import json
import sys
import time

import openai

BASE, MODEL, _MODEL_DIR, KEY, OTHER_KEY = sys.argv[1:6]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=60)
other = openai.OpenAI(base_url=f"{BASE}/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def upload(lines, name="requests.jsonl"):
    text = "".join(json.dumps(line) + "\n" if not isinstance(line, str) else line + "\n" for line in lines)
    return client.files.create(file=(name, io.BytesIO(text.encode())), purpose="batch")


def wait(batch_id, statuses, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    check(False, f"batch {batch_id} reached {statuses} in time (last: {batch.status}, {batch.request_counts})")


def lines_of(file_id):
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def comparable(body):
    """A response body without what differs between two answers to one request (its id and time)."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


# A chat batch: each line answered once, each body what the synchronous route answers (greedy decoding).
chat_requests = {
    f"chat-{i}": {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Count to {i}:"}],
        "max_tokens": 6,
        "temperature": 0,
        **({"n": 2} if i == 2 else {}),
    }
    for i in range(4)
}
chat_lines = [
    {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
    for cid, body in chat_requests.items()
]
# A blank line is skipped, not a request.
chat_file = upload(chat_lines[:2] + [""] + chat_lines[2:])
check(chat_file.object == "file" and chat_file.purpose == "batch" and chat_file.id.startswith("file-"),
      f"files.create stores a batch file: {chat_file}")
check(chat_file.bytes > 0 and chat_file.filename == "requests.jsonl", "the file's size and name are kept")
check(client.files.retrieve(chat_file.id) == chat_file, "files.retrieve describes it as created")
content = client.files.content(chat_file.id).text
check(content.splitlines()[0] == json.dumps(chat_lines[0]), "files.content gives back the bytes uploaded")

batch = client.batches.create(
    input_file_id=chat_file.id, endpoint="/v1/chat/completions", completion_window="24h",
    metadata={"suite": "batch_client"},
)
check(batch.object == "batch" and batch.status in ("validating", "in_progress"),
      f"batches.create answers the batch, validating: {batch.status}")
check(batch.metadata == {"suite": "batch_client"} and batch.expires_at is not None, "metadata and window kept")
done = wait(batch.id, ("completed", "failed", "expired", "cancelled"))
check(done.status == "completed", f"the chat batch completes: {done}")
check(done.request_counts.total == 4 and done.request_counts.completed == 4 and done.request_counts.failed == 0,
      f"request_counts: {done.request_counts}")
check(done.in_progress_at and done.finalizing_at and done.completed_at, "each status's time is stamped")
check(done.error_file_id is None, "no error file when nothing failed")
outputs = lines_of(done.output_file_id)
check(sorted(o["custom_id"] for o in outputs) == sorted(chat_requests), "every custom_id is answered exactly once")
for out in outputs:
    check(out["id"].startswith("batch_req_") and out["error"] is None, f"{out['custom_id']}: OpenAI's line shape")
    response = out["response"]
    check(response["status_code"] == 200 and response["request_id"], f"{out['custom_id']}: status 200")
    body = response["body"]
    check(body["object"] == "chat.completion", f"{out['custom_id']}: a chat completion")
    # A batch runs on the batch lane, and its bodies say so (`service_tier: flex`): the same request sent
    # synchronously on that lane is answered the same.
    sync = client.chat.completions.create(**chat_requests[out["custom_id"]], service_tier="flex")
    sync = sync.model_dump(exclude_unset=True)
    check(comparable(body) == comparable(sync),
          f"{out['custom_id']}: the body equals the synchronous route's ({body} vs {sync})")
check(len([o for o in outputs if o["custom_id"] == "chat-2"][0]["response"]["body"]["choices"]) == 2,
      "n=2 gives a line two choices")

# A completions batch, its output read as the SDK's own types.
completion_requests = {
    f"cmp-{i}": {"model": MODEL, "prompt": f"Once upon a time {i}", "max_tokens": 5, "temperature": 0}
    for i in range(3)
}
completion_file = upload(
    [{"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}
     for cid, body in completion_requests.items()]
)
second = client.batches.create(input_file_id=completion_file.id, endpoint="/v1/completions",
                               completion_window="24h")
second = wait(second.id, ("completed", "failed", "expired", "cancelled"))
check(second.status == "completed", f"the completions batch completes: {second}")
for out in lines_of(second.output_file_id):
    answered = openai.types.Completion.model_validate(out["response"]["body"])
    sync = client.completions.create(**completion_requests[out["custom_id"]], extra_body={"service_tier": "flex"})
    check(comparable(answered.model_dump(exclude_unset=True)) == comparable(sync.model_dump(exclude_unset=True)),
          f"{out['custom_id']}: the completion equals the synchronous route's ({answered} vs {sync})")

# Listing: newest first, paged with limit/after as OpenAI pages.
page = client.batches.list(limit=1)
check([b.id for b in page.data] == [second.id] and page.has_more, f"batches.list(limit=1) is the newest: {page}")
rest = client.batches.list(limit=10, after=second.id)
check([b.id for b in rest.data] == [batch.id] and not rest.has_more, "after= gives the next page")
everything = [b.id for b in client.batches.list()]
check(everything == [second.id, batch.id], f"the SDK's auto-paging list sees both: {everything}")
files = {f.id: f for f in client.files.list()}
check(chat_file.id in files and done.output_file_id in files, "files.list has the inputs and the outputs")
check(files[done.output_file_id].purpose == "batch_output", "an output file has purpose batch_output")

# Files and batches are their key's: another key is told they do not exist.
for what, call in [
    ("batches.retrieve", lambda: other.batches.retrieve(batch.id)),
    ("batches.cancel", lambda: other.batches.cancel(batch.id)),
    ("files.retrieve", lambda: other.files.retrieve(chat_file.id)),
    ("files.content", lambda: other.files.content(done.output_file_id)),
    ("files.delete", lambda: other.files.delete(chat_file.id)),
]:
    try:
        call()
        check(False, f"another key's {what} is refused")
    except openai.NotFoundError:
        check(True, f"another key's {what} is 404")
check(other.batches.list().data == [] and other.files.list().data == [], "another key lists nothing")
try:
    other.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    check(False, "another key cannot run a batch on this key's file")
except openai.NotFoundError:
    check(True, "another key cannot run a batch on this key's file (404)")

# Bad lines are named, by number, in the batch's errors; the batch fails.
bad = upload([
    chat_lines[0],
    "{not json",
    {**chat_lines[1], "url": "/v1/completions"},
    {**chat_lines[2], "custom_id": "chat-0"},
    {**chat_lines[3], "body": {**chat_requests["chat-3"], "temperature": -1}},
])
failed = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
failed = wait(failed.id, ("failed", "completed"))
check(failed.status == "failed" and failed.failed_at, f"a batch with bad lines fails: {failed.status}")
named = {e.line: e for e in failed.errors.data}
check(sorted(named) == [2, 3, 4, 5], f"its errors name lines 2 to 5: {failed.errors}")
check(named[2].code == "invalid_json" and named[3].code == "invalid_url" and named[4].code == "duplicate_custom_id",
      "each error says what is wrong")
check(named[5].param == "body.temperature" and "line 5" in named[5].message, f"and where: {named[5]}")
check(failed.output_file_id is None, "a failed batch ran nothing")

# Refusals at creation: a window other than 24h; a file that is not there.
try:
    client.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions", completion_window="1h")
    check(False, "a 1h window is refused")
except openai.BadRequestError as e:
    check(e.body["param"] == "completion_window", f"a 1h window is refused naming it: {e.body}")

# Cancel: the batch ends cancelled; what finished is kept; every custom_id is in one file, once.
many = {
    f"long-{i}": {"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 48,
                  "temperature": 0}
    for i in range(24)
}
long_file = upload([{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
                    for cid, body in many.items()])
running = client.batches.create(input_file_id=long_file.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
wait(running.id, ("in_progress",))
cancelling = client.batches.cancel(running.id)
check(cancelling.status in ("cancelling", "cancelled"), f"batches.cancel answers cancelling: {cancelling.status}")
cancelled = wait(running.id, ("cancelled",))
check(cancelled.cancelling_at and cancelled.cancelled_at, "cancelling_at and cancelled_at are stamped")
answered = lines_of(cancelled.output_file_id)
unanswered = lines_of(cancelled.error_file_id)
ids = [o["custom_id"] for o in answered + unanswered]
check(sorted(ids) == sorted(many), f"every custom_id is in the output or error file exactly once ({len(ids)})")
check(all(o["response"]["status_code"] == 200 for o in answered), "the output file holds the finished lines")
check(all(o["error"]["code"] == "batch_cancelled" for o in unanswered if o["response"] is None),
      "the lines that never ran say batch_cancelled")
check(len(unanswered) > 0, "a batch cancelled at once leaves lines unrun")
check(cancelled.request_counts.completed == len(answered) and cancelled.request_counts.failed == len(unanswered),
      f"request_counts match the files: {cancelled.request_counts}")
try:
    client.batches.cancel(done.id)
    check(False, "a completed batch cannot be cancelled")
except openai.ConflictError:
    check(True, "a completed batch cannot be cancelled (409)")

# A file larger than a request body (64 KiB) is streamed in whole; one over --max-file-bytes (1 MB here) is
# refused, and nothing of it is kept.
big_lines = [{**chat_lines[0], "custom_id": f"big-{i}"} for i in range(1500)]
big = upload(big_lines, name="big.jsonl")
check(big.bytes > 64 * 1024 and client.files.content(big.id).text.count("\n") == 1500,
      f"a {big.bytes}-byte file is stored whole")
before = {f.id for f in client.files.list()}
try:
    upload(big_lines * 6, name="huge.jsonl")
    check(False, "a file over --max-file-bytes is refused")
except openai.APIStatusError as e:
    check(e.status_code == 413, f"a file over --max-file-bytes is refused with 413: {e.status_code}")
    # The upload's rest was never read, so the server closes the connection, and says so: the client's next
    # request must not go out on it.
    check(e.response.headers.get("connection") == "close", "the 413 closes its connection and says so")
check({f.id for f in client.files.list()} == before, "a refused upload leaves no file")

# Deleting a file.
deleted = client.files.delete(completion_file.id)
check(deleted.deleted and deleted.id == completion_file.id, f"files.delete: {deleted}")
try:
    client.files.retrieve(completion_file.id)
    check(False, "a deleted file is gone")
except openai.NotFoundError:
    check(True, "a deleted file is gone (404)")

print("all batch API checks passed")
