#!/usr/bin/env python3
"""Priority lanes under load: one worker, a batch-lane backlog, interactive jobs arriving.

Talks AMQP to the worker as docs/amqp.md describes (pika), so the figures are the worker's scheduling and
nothing else; every phase runs on the same worker process, in one run:

  (1) idle:       N interactive jobs arriving every GAP seconds on an idle worker;
  (2) batch only: the worker running only the batch lane (a backlog, nothing else): its tokens/s in steady
                  state, over K completions; and the same jobs on the interactive lane, which may use every
                  place of the batch (what the worker does without lanes);
  (3) loaded:     a backlog of BACKLOG batch jobs queued, then the same N interactive jobs at the same gaps:
                  their latency against (1);
  (4) pause:      interactive traffic stops; the batch lane's tokens/s over the next K completions, against
                  both figures of (2).

Latency is publish to `job.succeeded` received. Every job is greedy with `ignore_eos`, so each generates
exactly its tokens. What is left of the backlog is deleted with the namespace at the end.
"""

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

import pika


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def parameters(url):
    """The broker's URL, without heartbeats: the bench's threads block on their own waits for minutes."""
    params = pika.URLParameters(url)
    params.heartbeat = 0
    return params


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Replies(threading.Thread):
    """Consumes the reply queue on a connection of its own, timestamping every final reply."""

    def __init__(self, url, queue):
        super().__init__(daemon=True)
        self.url, self.queue = url, queue
        self.lock = threading.Condition()
        self.done = {}  # job id -> (monotonic time, reply body)
        self.order = []  # job ids in the order their final reply came
        self.started = {}  # job id -> monotonic time of job.started
        self.ready = threading.Event()

    def run(self):
        conn = pika.BlockingConnection(parameters(self.url))
        ch = conn.channel()
        ch.queue_declare(self.queue, exclusive=True, auto_delete=True)
        self.ready.set()
        for method, props, body in ch.consume(self.queue, auto_ack=True):
            kind = props.type or ""
            if kind == "job.token":
                continue
            now = time.monotonic()
            with self.lock:
                if kind == "job.started":
                    self.started[props.correlation_id] = now
                else:
                    self.done[props.correlation_id] = (now, json.loads(body))
                    self.order.append(props.correlation_id)
                    self.lock.notify_all()

    def wait_for(self, ids, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(i in self.done for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [i for i in ids if i not in self.done]
                    raise SystemExit(f"{len(missing)} jobs unanswered after {timeout} s")
                self.lock.wait(left)

    def completions(self):
        with self.lock:
            return list(self.order)


class Bench:
    def __init__(self, args):
        self.args = args
        self.jobs = f"{args.namespace}.jobs"
        self.batch = f"{args.namespace}.jobs.batch"
        self.reply_to = f"{args.namespace}.bench.replies.{uuid.uuid4().hex[:8]}"
        self.replies = Replies(args.amqp_url, self.reply_to)
        self.replies.start()
        self.replies.ready.wait(10)
        self.conn = pika.BlockingConnection(parameters(args.amqp_url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.sent = {}  # job id -> monotonic publish time

    def publish(self, queue, prompt, tokens):
        job_id = str(uuid.uuid4())
        body = {"version": 1, "prompt": prompt,
                "parameters": {"strategy": "greedy", "max_new_tokens": tokens, "ignore_eos": True}}
        props = pika.BasicProperties(correlation_id=job_id, message_id=job_id, reply_to=self.reply_to,
                                     content_type="application/json", delivery_mode=2)
        self.sent[job_id] = time.monotonic()
        self.ch.basic_publish("", queue, json.dumps(body).encode(), props, mandatory=True)
        return job_id

    def interactive_phase(self, label):
        a = self.args
        ids, t0 = [], time.monotonic()
        for i in range(a.interactive_jobs):
            wait = t0 + i * a.gap - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ids.append(self.publish(self.jobs, f"Interactive question number {i}", a.interactive_tokens))
        self.replies.wait_for(ids, a.timeout)
        latencies = [self.replies.done[i][0] - self.sent[i] for i in ids]
        failed = [i for i in ids if self.replies.done[i][1].get("event") != "job.succeeded"]
        if failed:
            raise SystemExit(f"{label}: {len(failed)} interactive jobs failed: {self.replies.done[failed[0]][1]}")
        log(f"{label}: interactive p50 {percentile(latencies, 0.5):.3f} s, p99 {percentile(latencies, 0.99):.3f} s")
        return latencies

    def rate_over(self, batch_ids, skip, count, timeout):
        """Batch tokens/s between the `skip`-th and the `skip+count`-th batch completion from now."""
        batch_ids = set(batch_ids)
        deadline = time.monotonic() + timeout
        seen_before = {i for i in self.replies.completions() if i in batch_ids}
        while True:
            done = [i for i in self.replies.completions() if i in batch_ids and i not in seen_before]
            if len(done) >= skip + count:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(done)} batch completions in {timeout} s")
            time.sleep(0.05)
        window = done[skip:skip + count]
        t_start = self.replies.done[done[skip - 1]][0] if skip else self.sent[window[0]]
        t_end = self.replies.done[window[-1]][0]
        tokens = sum(self.replies.done[i][1].get("new_tokens", 0) for i in window)
        return tokens / (t_end - t_start)

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


def start_worker(args):
    cmd = [args.worker, "serve", "--model", args.model, "--threads", str(args.threads), "--dtype", "float32",
           "--namespace", args.namespace, "--amqp-url", args.amqp_url, "--worker-id", "bench-lanes",
           "--max-batch-size", str(args.max_batch_size), "--interactive-reserve", str(args.reserve),
           "--pause-batch-lane", args.pause, "--stream-tokens", "0"]
    log(f"starting the worker: {shlex.join(cmd)}")
    os.makedirs(args.log_dir, exist_ok=True)
    path = os.path.join(args.log_dir, "worker.log")
    env = dict(os.environ, RUST_LOG=os.environ.get("WORKER_RUST_LOG", "warn,worker=info"), LOG_FORMAT="text")
    proc = subprocess.Popen(cmd, stdout=open(path, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while "consuming jobs" not in open(path, errors="replace").read():
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}); see {path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start; see {path}")
        time.sleep(0.2)
    return proc, cmd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--reserve", type=int, default=1, help="--interactive-reserve")
    p.add_argument("--pause", choices=["auto", "on", "off"], default="auto", help="--pause-batch-lane")
    p.add_argument("--backlog", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=32)
    p.add_argument("--interactive-jobs", type=int, default=20)
    p.add_argument("--interactive-tokens", type=int, default=16)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between interactive arrivals")
    p.add_argument("--window", type=int, default=32, help="batch completions a tokens/s figure is taken over")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--namespace", required=True)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--log-dir", default="target/bench-lanes-logs")
    p.add_argument("--command", default="")
    args = p.parse_args()
    # Stopped (SIGTERM, ^C), it still stops its worker: the `finally` below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not os.path.exists(os.path.join(args.model, "config.json")):
        log(f"writing the medium checkpoint to {args.model}")
        subprocess.run([args.worker, "init-tiny-model", args.model, "--preset", "medium"], check=True,
                       stdout=subprocess.DEVNULL)
    proc, cmd = start_worker(args)
    bench = Bench(args)
    runs = []
    try:
        # Warm-up: the first jobs pay for allocations the rest reuse.
        warm = [bench.publish(bench.jobs, "Warm up", args.interactive_tokens) for _ in range(args.max_batch_size)]
        bench.replies.wait_for(warm, args.timeout)
        for run in range(args.runs):
            log(f"run {run + 1} of {args.runs}")
            idle = bench.interactive_phase("(1) idle")
            # (2) the batch lane alone, in steady state: a backlog of its own, its rate after the first
            # batch's worth of completions.
            n = args.max_batch_size + args.window + args.max_batch_size
            rates = []
            for queue in (bench.batch, bench.jobs):
                only = [bench.publish(queue, f"Batch document {i}", args.batch_tokens) for i in range(n)]
                rates.append(bench.rate_over(only, args.max_batch_size, args.window, args.timeout))
                bench.replies.wait_for(only, args.timeout)
            alone, full = rates
            log(f"(2) batch only: {alone:.1f} tokens/s on the batch lane, {full:.1f} on every place")
            # (3) a long backlog, then interactive traffic.
            backlog = [bench.publish(bench.batch, f"Batch document {i}", args.batch_tokens)
                       for i in range(args.backlog)]
            bench.rate_over(backlog, 0, args.max_batch_size, args.timeout)  # the batch lane is running
            loaded = bench.interactive_phase("(3) loaded")
            # (4) interactive traffic pauses: the batch lane's rate.
            paused = bench.rate_over(backlog, args.max_batch_size, args.window, args.timeout)
            log(f"(4) pause: {paused:.1f} tokens/s")
            bench.ch.queue_purge(bench.batch)
            in_flight = [i for i in backlog if i not in bench.replies.done]
            # The purge took what was queued; the worker still finishes what it holds.
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                time.sleep(0.5)
                in_flight = [i for i in in_flight if i not in bench.replies.done]
                q = bench.ch.queue_declare(bench.batch, passive=True)
                if q.method.message_count == 0 and len(in_flight) <= 0:
                    break
                if q.method.message_count == 0 and all(
                        i not in bench.replies.started or i in bench.replies.done for i in in_flight):
                    break
            runs.append({"idle": idle, "loaded": loaded, "alone": alone, "full": full, "paused": paused})
    finally:
        bench.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    print()
    print(f"Command: `{args.command}`  ")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"Machine: {cpu}, {os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.1f}  ")
    print(f"Worker: `{shlex.join(cmd)}`  ")
    print(f"Workload: backlog {args.backlog} batch jobs × {args.batch_tokens} tokens; "
          f"{args.interactive_jobs} interactive jobs × {args.interactive_tokens} tokens, one every {args.gap:g} s; "
          f"tokens/s over {args.window} batch completions in steady state")
    print()
    print("| run | interactive p50 idle / loaded (s) | p50 ratio | p99 idle / loaded (s) | p99 ratio "
          "| batch lane alone / every place (tok/s) | batch, interactive paused (tok/s) "
          "| vs batch lane alone | vs every place |")
    print("|---|---|---|---|---|---|---|---|---|")

    def ratios(r):
        return (percentile(r["loaded"], .5) / percentile(r["idle"], .5),
                percentile(r["loaded"], .99) / percentile(r["idle"], .99),
                r["paused"] / r["alone"], r["paused"] / r["full"])

    for i, r in enumerate(runs, 1):
        p50, p99, lane, full = ratios(r)
        print(f"| {i} | {percentile(r['idle'], .5):.3f} / {percentile(r['loaded'], .5):.3f} | **{p50:.2f}×** "
              f"| {percentile(r['idle'], .99):.3f} / {percentile(r['loaded'], .99):.3f} | **{p99:.2f}×** "
              f"| {r['alone']:.1f} / {r['full']:.1f} | {r['paused']:.1f} | **{lane:.2f}×** | **{full:.2f}×** |")
    if len(runs) > 1:
        med = [statistics.median(ratios(r)[k] for r in runs) for k in range(4)]
        print(f"| median | | **{med[0]:.2f}×** | | **{med[1]:.2f}×** | | | **{med[2]:.2f}×** | **{med[3]:.2f}×** |")
    print()
    print("Targets: interactive p50 and p99 loaded within 1.25× of idle; batch tokens/s while interactive "
          "traffic pauses at least 0.8× a worker running only the batch.")


if __name__ == "__main__":
    main()
