"""Publish a job over AMQP, stream its tokens, then cancel it: the pika example of docs/amqp.md.

Run against a running worker (scripts/up.sh starts one):  python worker/examples/amqp_cancel.py
Environment: AMQP_URL (default the local broker), NAMESPACE (default gptj).
"""

import json
import os
import sys
import time
import uuid

import pika  # pip install pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
namespace = os.environ.get("NAMESPACE", "gptj")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()
reply_to = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

# A long job: 1,000 tokens at least, so there is time to cancel it.
job_id = str(uuid.uuid4())
body = {"version": 1, "prompt": "Once upon a time",
        "parameters": {"strategy": "greedy", "max_new_tokens": 1000, "min_new_tokens": 1000}}
channel.basic_publish(
    exchange="", routing_key=f"{namespace}.jobs", body=json.dumps(body).encode(), mandatory=True,
    properties=pika.BasicProperties(correlation_id=job_id, message_id=job_id, reply_to=reply_to,
                                    content_type="application/json", delivery_mode=2))
print(f"queued job {job_id}")


def cancel(job):
    """A cancel goes to the fanout exchange `{ns}.control`; every worker reads it, wherever the job is."""
    channel.basic_publish(
        exchange=f"{namespace}.control", routing_key="", mandatory=True,
        body=json.dumps({"version": 1, "job_id": job}).encode(),
        properties=pika.BasicProperties(type="job.cancel", content_type="application/json", delivery_mode=2,
                                        timestamp=int(time.time())))


text, cancelled = "", False
for method, props, payload in channel.consume(reply_to, auto_ack=True, inactivity_timeout=60):
    if method is None:
        sys.exit("no reply within 60 s")
    if props.correlation_id != job_id:
        continue
    reply = json.loads(payload)
    if props.type == "job.started":
        print(f"started on {reply['worker_id']}")
    elif props.type == "job.token":
        text += reply["text"]  # chunks follow each other: reply["text_offset"] == len(text) before this one
        if not cancelled and reply["index"] + len(reply["token_ids"]) >= 20:
            cancel(job_id)
            cancelled = True
            print(f"cancelling after {len(text)} characters: {text!r}")
    elif props.type == "job.cancelled":
        print(f"cancelled after {reply['new_tokens']} tokens")
        break
    elif props.type in ("job.succeeded", "job.failed"):
        sys.exit(f"the job ended {props.type} instead of being cancelled")

channel.cancel()
connection.close()
