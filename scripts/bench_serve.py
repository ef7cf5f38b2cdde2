"""The measurements behind scripts/bench-serve.sh (run that, not this).

Continuous batching in one worker, against the same worker running one job at a time (`--max-batch-size 1`)
and against transformers' batched `generate`, on the medium random GPT-J (8 x 1024), float32, THREADS
libtorch threads, in one run. Jobs go through the whole service (gateway, Redis, RabbitMQ, worker):

  (a) JOBS concurrent greedy jobs of TOKENS new tokens, JOBS different prompts of similar length;
  (b) the same with contrastive search (penalty_alpha 0.6, top_k 4);
  (c) a mixed workload: MIXED_JOBS jobs arriving as a Poisson process (seeded), max_new_tokens uniform in
      [MIXED_MIN_TOKENS, MIXED_MAX_TOKENS], greedy / sample (seeded) / contrastive in equal parts;
  and the cost of token streaming: (a) again on the continuous worker with streaming off
  (`--stream-tokens 0`), every other setting the same, against the continuous rows (streaming on, the
  default: `job.token` replies through the broker into each job's Redis event log).

Every job asks min_new_tokens = max_new_tokens (transformers gets the same), so EOS cannot end a sequence
early and every side generates exactly the tokens asked; the script checks the counts. Latency is measured
here, from just before the submitting request to the moment the gateway's final job record is written (its
completion notice on Redis, `{ns}:done`, which is what wakes `POST /run`; a slow poll of the job backs it
up). Time to first token is the server's: the job's wait in the broker (`timings.queued_ms`) plus the
worker's `time_to_first_token_ms` (from the job reaching its engine, a wait for a place in the batch
included), or plus its prefill time where the worker does not report one.

Prints Markdown to stdout; `--json FILE` writes the same numbers as JSON. Progress goes to stderr.
"""

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))

# 16 prompts of similar length (about 10 to 20 GPT-J tokens each), only characters the gateway's default
# prompt rules keep, so the text the worker tokenizes is the text transformers tokenizes.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest.",
    "Once upon a time, in a land far away, there lived a wise old king.",
    "In the middle of the night, the old lighthouse keeper heard a strange sound.",
    "Scientists announced today that they have discovered a new species of deep sea fish.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "After years of hard work, she finally opened her own small bakery downtown.",
    "The train to the capital was delayed by three hours because of heavy snow.",
    "He opened the letter slowly, afraid of what it might say about his future.",
    "Our team meeting is scheduled for Tuesday morning in the large conference room.",
    "The museum's new exhibit shows paintings from the early years of the century.",
    "Why do cats always seem to land on their feet when they fall from a height?",
    "The city council voted last night to build a new park near the river.",
    "A good night's sleep is one of the best things you can do for your health.",
    "The spaceship slowly drifted toward the red planet as the crew watched in silence.",
    "My grandmother used to tell us stories about the village where she grew up.",
    "The football match ended in a draw after ninety minutes of intense play.",
]


def log(msg):
    print(f"--- {msg}", file=sys.stderr, flush=True)


def percentile(values, q):
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def nproc():
    try:
        return int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        return os.cpu_count()


# ---------------------------------------------------------------------------------------------------------
# transformers, in a child process of its own (so its threads and memory are gone while the service runs)
# ---------------------------------------------------------------------------------------------------------


def hf_child(spec):
    """Batched `generate` of spec["prompts"]: a warm-up call, then one timed call per strategy."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTJForCausalLM

    torch.set_num_threads(spec["threads"])
    model_dir = spec["model"]
    model = GPTJForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = [tok.encode(p, add_special_tokens=False).ids for p in spec["prompts"]]
    width = max(len(i) for i in ids)
    # Left padding with EOS as the pad token; the attention mask hides the padding (generate derives the
    # position ids from it).
    input_ids = torch.tensor([[eos] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    out = {"prompt_tokens": [len(i) for i in ids], "torch": torch.__version__, "runs": {}}
    for run in spec["runs"]:
        n = run["tokens"]
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos)
        if run["strategy"] == "contrastive":
            kwargs.update(penalty_alpha=0.6, top_k=4)
        with torch.no_grad():
            warm = dict(kwargs, max_new_tokens=min(4, n), min_new_tokens=min(4, n))
            model.generate(input_ids, attention_mask=mask, **warm)
            start = time.perf_counter()
            gen = model.generate(input_ids, attention_mask=mask, **kwargs)
            took = time.perf_counter() - start
        new = gen[:, width:]
        # Exactly n new tokens per row, none of them EOS (which would be padding after an early stop).
        assert new.shape == (len(ids), n), (tuple(new.shape), n)
        assert not bool((new == eos).any()), "transformers emitted EOS despite min_new_tokens"
        out["runs"][run["strategy"]] = {"seconds": took, "new_tokens": int(new.numel())}
        print(f"--- transformers {run['strategy']}: {new.numel()} tokens in {took:.2f} s", file=sys.stderr,
              flush=True)
    print(json.dumps(out))


def run_transformers(args, prompts, runs):
    spec = {"model": args.model, "threads": args.threads, "prompts": prompts, "runs": runs}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-child"], input=json.dumps(spec),
                          stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The service: gateway and worker processes, HTTP, and the completion notices
# ---------------------------------------------------------------------------------------------------------


class Http:
    """One keep-alive connection per thread."""

    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port or 80
        self.local = threading.local()

    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
                self.local.conn = conn
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class DoneListener(threading.Thread):
    """Subscribes to the gateway's completion channel (`{ns}:done`, the job id of every job whose final
    record was just written) with a minimal RESP client, and timestamps each notice on arrival."""

    def __init__(self, redis_url, channel):
        super().__init__(daemon=True)
        u = urllib.parse.urlsplit(redis_url)
        self.addr = (u.hostname or "127.0.0.1", u.port or 6379)
        self.password = urllib.parse.unquote(u.password) if u.password else None
        self.username = urllib.parse.unquote(u.username) if u.username else None
        self.channel = channel
        self.lock = threading.Lock()
        self.done = {}  # job id -> perf_counter() at the notice
        self.events = {}
        self.ready = threading.Event()
        self.error = None

    def event(self, job_id):
        with self.lock:
            return self.events.setdefault(job_id, threading.Event())

    def done_at(self, job_id):
        with self.lock:
            return self.done.get(job_id)

    @staticmethod
    def _cmd(*parts):
        out = [f"*{len(parts)}\r\n".encode()]
        for p in parts:
            b = p.encode()
            out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
        return b"".join(out)

    @staticmethod
    def _read(f):
        line = f.readline()
        if not line:
            raise EOFError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"*":
            return [DoneListener._read(f) for _ in range(int(rest))]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)
            return data[:-2].decode()
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        return rest.decode()

    def run(self):
        try:
            sock = socket.create_connection(self.addr, timeout=10)
            sock.settimeout(None)
            f = sock.makefile("rb")
            if self.password:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                sock.sendall(self._cmd(*auth))
                self._read(f)
            sock.sendall(self._cmd("SUBSCRIBE", self.channel))
            self._read(f)  # ["subscribe", channel, 1]
            self.ready.set()
            while True:
                msg = self._read(f)
                now = time.perf_counter()
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == "message":
                    with self.lock:
                        self.done.setdefault(msg[2], now)
                        ev = self.events.setdefault(msg[2], threading.Event())
                    ev.set()
        except Exception as e:  # noqa: BLE001 - reported, and the slow poll takes over
            self.error = e
            self.ready.set()


class Service:
    def __init__(self, args):
        self.args = args
        self.base = f"http://127.0.0.1:{args.port}"
        self.http = Http(self.base)
        self.gateway = None
        self.worker = None
        self.worker_log = None
        self.listener = None
        os.makedirs(args.log_dir, exist_ok=True)
        help_text = subprocess.run([args.worker, "serve", "--help"], capture_output=True, text=True).stdout
        self.has_max_batch = "--max-batch-size" in help_text

    # processes

    def start_gateway(self):
        a = self.args
        env = dict(os.environ, RUST_LOG=os.environ.get("GATEWAY_RUST_LOG", "warn"))
        cmd = [a.gateway, "--listen", f"127.0.0.1:{a.port}", "--namespace", a.namespace,
               "--amqp-url", a.amqp_url, "--redis-url", a.redis_url,
               "--submit-rate-limit", "1000000000/1s", "--read-rate-limit", "1000000000/1s",
               "--token-rate-limit", "1000000000/1s", "--max-active-jobs-per-client", "0"]
        log(f"starting the gateway: {shlex.join(cmd)}")
        out = open(os.path.join(a.log_dir, "gateway.log"), "w")
        self.gateway = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.gateway.poll() is not None:
                raise SystemExit(f"the gateway exited ({self.gateway.returncode}); see {a.log_dir}/gateway.log")
            try:
                status, _ = self.http.request("GET", "/readyz", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the gateway did not become ready; see {a.log_dir}/gateway.log")
            time.sleep(0.1)
        if a.no_notices:
            return
        self.listener = DoneListener(a.redis_url, f"{a.namespace}:done")
        self.listener.start()
        self.listener.ready.wait(10)
        if self.listener.error or not self.listener.ready.is_set():
            log(f"WARNING: no completion notices ({self.listener.error}); latencies fall back to "
                f"{a.poll_ms} ms polling")

    def start_worker(self, name, max_batch, extra=()):
        a = self.args
        cmd = [a.worker, "serve", "--model", a.model, "--threads", str(a.threads), "--dtype", "float32",
               "--namespace", a.namespace, "--amqp-url", a.amqp_url, "--worker-id", f"bench-{name}"]
        if self.has_max_batch:
            cmd += ["--max-batch-size", str(max_batch)]
        elif max_batch != 1:
            log("WARNING: this worker has no --max-batch-size; the continuous configuration runs it as it is")
        cmd += shlex.split(a.worker_args) + list(extra)
        log(f"starting the worker ({name}): {shlex.join(cmd)}")
        env = dict(os.environ, RUST_LOG=os.environ.get("WORKER_RUST_LOG", "info"), LOG_FORMAT="text")
        path = os.path.join(a.log_dir, f"worker-{name}.log")
        self.worker_log = path
        out = open(path, "w")
        self.worker = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + a.ready_timeout
        while True:
            if self.worker.poll() is not None:
                tail = open(path).read()[-3000:]
                raise SystemExit(f"the worker exited ({self.worker.returncode}); {path}:\n{tail}")
            if "consuming jobs" in open(path, errors="replace").read():
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start consuming in {a.ready_timeout} s; see {path}")
            time.sleep(0.2)
        # The broker's view too: the gateway's consumer count (stats are cached for a few ms).
        while time.monotonic() < deadline:
            try:
                status, q = self.http.request("GET", "/v1/queue")
                if status == 200 and (q or {}).get("consumers", 0) >= 1:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        return cmd

    def stop_worker(self):
        if self.worker is None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(60)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        self.worker = None

    def stop(self):
        self.stop_worker()
        if self.gateway is not None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(30)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
            self.gateway = None

    # jobs

    def run_job(self, body, start_event=None, at=None):
        """Submits one job and waits for its final record. Returns a dict of client-side times and the
        job record (read after the clock stopped)."""
        if start_event is not None:
            start_event.wait()
        if at is not None:
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t0 = time.perf_counter()
        status, accepted = self.http.request("POST", "/v1/jobs", body)
        if status != 202:
            raise RuntimeError(f"submission answered {status}: {accepted}")
        job_id = accepted["id"]
        ev = self.listener.event(job_id) if self.listener else threading.Event()
        deadline = t0 + self.args.job_timeout
        via = "notice"
        while True:
            if ev.wait(self.args.poll_ms / 1000.0):
                t1 = self.listener.done_at(job_id)
                break
            now = time.perf_counter()
            status, record = self.http.request("GET", f"/v1/jobs/{job_id}")
            if status == 200 and record.get("status") in ("succeeded", "failed", "expired"):
                t1 = self.listener.done_at(job_id) if self.listener else None
                if t1 is None:
                    t1, via = now, "poll"
                break
            if now > deadline:
                raise RuntimeError(f"job {job_id} not finished after {self.args.job_timeout} s")
        status, record = self.http.request("GET", f"/v1/jobs/{job_id}")
        if status != 200 or record.get("status") != "succeeded":
            raise RuntimeError(f"job {job_id} did not succeed: {status} {record}")
        return {"t0": t0, "t1": t1, "via": via, "record": record}


def find(record, key):
    """A field of the job record wherever this version puts it: `timings`, `result`, or the top level."""
    for place in (record.get("timings") or {}, record.get("result") or {}, record):
        if isinstance(place, dict) and place.get(key) is not None:
            return place[key]
    return None


def summarize(name, engine, jobs, asked_tokens):
    """Rows of the table from the finished jobs of one phase."""
    t_first = min(j["t0"] for j in jobs)
    t_last = max(j["t1"] for j in jobs)
    wall = t_last - t_first
    tokens = 0
    mismatched = 0
    lat, ttft, batch, ttft_client, details = [], [], [], [], []
    ttft_source = None
    for j, asked in zip(jobs, asked_tokens):
        rec = j["record"]
        n = (rec.get("result") or {}).get("new_tokens")
        if n is None:
            n = len((rec.get("result") or {}).get("token_ids") or [])
        tokens += n
        mismatched += n != asked
        lat.append(j["t1"] - j["t0"])
        t = rec.get("timings") or {}
        # The wait in the broker: submission to a worker taking the job (the reply's `queued_ms`; older
        # records only have `started_at_ms`, which was that moment before job.started moved to joining).
        waited = None
        if t.get("queued_ms") is not None:
            waited = t["queued_ms"] / 1000.0
        elif t.get("started_at_ms") is not None and t.get("submitted_at_ms") is not None:
            waited = (t["started_at_ms"] - t["submitted_at_ms"]) / 1000.0
        first = find(rec, "time_to_first_token_ms")
        if first is not None and waited is not None:
            ttft.append(waited + first / 1000.0)
            ttft_source = ttft_source or "server"
        elif waited is not None and t.get("prefill_ms") is not None:
            ttft.append(waited + t["prefill_ms"] / 1000.0)
            ttft_source = "prefill"
        b = find(rec, "batch_size")
        if isinstance(b, int):
            batch.append(b)
        if t.get("decode_ms") is not None:
            ttft_client.append(j["t1"] - j["t0"] - t["decode_ms"] / 1000.0)
        params = rec.get("parameters") or {}
        details.append({"submitted_s": j["t0"] - t_first, "latency_s": j["t1"] - j["t0"], "new_tokens": n,
                        "asked_tokens": asked, "strategy": params.get("strategy"), "timed_by": j["via"],
                        "batch_size": b, "timings": t})
    return {
        "workload": name, "engine": engine, "jobs": len(jobs), "new_tokens": tokens,
        "asked_tokens": sum(asked_tokens), "mismatched_jobs": mismatched, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
        "p50_ttft_s": percentile(ttft, 50) if ttft else None, "ttft_source": ttft_source,
        # Cross-check: the client's latency less the worker's decode time (first token to last).
        "p50_ttft_client_s": percentile(ttft_client, 50) if ttft_client else None,
        "max_batch": max(batch) if batch else None,
        "mean_batch": sum(batch) / len(batch) if batch else None,
        "polled": sum(j["via"] == "poll" for j in jobs),
        "job_details": details,
    }


def run_phase(svc, bodies, arrivals=None):
    """Runs the jobs on one thread each: all released together, or at `arrivals` (seconds from now)."""
    results = [None] * len(bodies)
    errors = []
    go = threading.Event()

    def one(i, at):
        try:
            results[i] = svc.run_job(bodies[i], start_event=go, at=at)
        except Exception as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    base = time.perf_counter() + 0.2
    threads = []
    for i in range(len(bodies)):
        at = None if arrivals is None else base + arrivals[i]
        t = threading.Thread(target=one, args=(i, at), daemon=True)
        t.start()
        threads.append(t)
    time.sleep(max(0.0, base - time.perf_counter()))
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def job_body(prompt, strategy, n, seed=None):
    params = {"strategy": strategy, "max_new_tokens": n, "min_new_tokens": n}
    if strategy == "contrastive":
        params.update(penalty_alpha=0.6, top_k=4)
    elif strategy == "sample":
        params.update(seed=seed)
    return {"prompt": prompt, "parameters": params}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker")
    p.add_argument("--gateway")
    p.add_argument("--model", help="medium checkpoint directory (written with init-tiny-model if missing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--contrastive-tokens", type=int, help="tokens per job in (b); default --tokens")
    p.add_argument("--mixed-jobs", type=int, default=64)
    p.add_argument("--mixed-rate", type=float, default=2.0, help="mean arrivals per second in (c)")
    p.add_argument("--mixed-min-tokens", type=int, default=8)
    p.add_argument("--mixed-max-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=16, help="of the continuous configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--namespace", default=f"bench{os.getpid()}")
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/")
    p.add_argument("--worker-args", default="", help="extra `worker serve` flags for both configurations")
    p.add_argument("--poll-ms", type=int, default=1000, help="fallback poll of a job (completion notices "
                   "timestamp it otherwise)")
    p.add_argument("--no-notices", action="store_true", help=argparse.SUPPRESS)  # tests the fallback poll
    p.add_argument("--job-timeout", type=float, default=1800)
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--log-dir", default=os.path.join(HERE, "..", "target", "bench-serve-logs"))
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: greedy,contrastive,mixed")
    p.add_argument("--command", help="the command line to print (the shell wrapper passes its own)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    if args.hf_child:
        hf_child(json.load(sys.stdin))
        return
    for req in ("worker", "gateway", "model"):
        if not getattr(args, req):
            p.error(f"--{req} is required")
    args.contrastive_tokens = args.contrastive_tokens or args.tokens
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    load_before = loadavg()

    if not os.path.exists(os.path.join(args.model, "config.json")):
        log(f"writing the medium checkpoint to {args.model}")
        subprocess.run([args.worker, "init-tiny-model", args.model, "--preset", "medium"], check=True,
                       stdout=subprocess.DEVNULL)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.jobs)]
    if args.jobs > len(PROMPTS):
        log(f"only {len(PROMPTS)} different prompts: {args.jobs} jobs repeat some")
    phases = []  # (key, title, strategy, tokens)
    if "greedy" not in skip:
        phases.append(("greedy", f"(a) {args.jobs} × greedy, {args.tokens} tokens", "greedy", args.tokens))
    if "contrastive" not in skip:
        phases.append(("contrastive", f"(b) {args.jobs} × contrastive, {args.contrastive_tokens} tokens",
                       "contrastive", args.contrastive_tokens))

    # The mixed workload, drawn once (seeded) and replayed identically against both configurations.
    rng = random.Random(args.seed)
    n_mixed = args.mixed_jobs if "mixed" not in skip else 0
    strategies = (["greedy", "sample", "contrastive"] * n_mixed)[:n_mixed]
    rng.shuffle(strategies)
    mixed, arrivals, t = [], [], 0.0
    for i in range(n_mixed):
        if i:
            t += rng.expovariate(args.mixed_rate)
        arrivals.append(t)
        n = rng.randint(args.mixed_min_tokens, args.mixed_max_tokens)
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        mixed.append((job_body(prompt, strategies[i], n, seed=args.seed * 1000 + i), n))
    mixed_title = (f"(c) mixed, {n_mixed} jobs, Poisson {args.mixed_rate:g}/s, "
                   f"{args.mixed_min_tokens}..{args.mixed_max_tokens} tokens, greedy/sample/contrastive")

    rows = []
    hf = None
    if not args.skip_transformers and phases:
        log("transformers: batched generate (warm-up call first)")
        hf = run_transformers(args, prompts, [{"strategy": s, "tokens": n} for _, _, s, n in phases])

    svc = Service(args)
    # (name, max batch, extra flags, phases it runs): the streaming-off worker repeats (a) only.
    configs = [("continuous", args.max_batch_size, [], None), ("batch-1", 1, [], None)]
    if "greedy" not in skip and "stream" not in skip:
        configs.append(("no-stream", args.max_batch_size, ["--stream-tokens", "0"], {"greedy"}))
    worker_cmds = {}
    try:
        svc.start_gateway()
        for name, max_batch, extra, only in configs:
            worker_cmds[name] = svc.start_worker(name, max_batch, extra)
            # Warm-up through the whole path: a few short jobs of each strategy, excluded from the numbers.
            warm = [job_body(PROMPTS[i], s, 4, seed=i) for s in ("greedy", "contrastive", "sample")
                    for i in range(min(4, max(1, args.jobs)))]
            run_phase(svc, warm)
            for key, title, strategy, n in phases:
                if only is not None and key not in only:
                    continue
                log(f"{name}: {title}")
                bodies = [job_body(pr, strategy, n) for pr in prompts]
                res = run_phase(svc, bodies)
                rows.append(dict(summarize(title, name, res, [n] * len(bodies)), phase=key))
                log(f"  {rows[-1]['new_tokens']} tokens in {rows[-1]['wall_s']:.2f} s: "
                    f"{rows[-1]['tokens_per_s']:.1f} tok/s")
            if mixed and only is None:
                log(f"{name}: {mixed_title}")
                res = run_phase(svc, [b for b, _ in mixed], arrivals)
                rows.append(dict(summarize(mixed_title, name, res, [n for _, n in mixed]), phase="mixed"))
                r = rows[-1]
                log(f"  {r['new_tokens']} tokens in {r['wall_s']:.2f} s: {r['tokens_per_s']:.1f} tok/s, "
                    f"p99 {r['p99_latency_s']:.2f} s")
            svc.stop_worker()
    finally:
        svc.stop()

    if hf:
        for key, title, strategy, n in phases:
            r = hf["runs"][strategy]
            rows.append({
                "workload": title, "engine": "transformers", "phase": key, "jobs": args.jobs,
                "new_tokens": r["new_tokens"], "asked_tokens": n * args.jobs, "mismatched_jobs": 0,
                "wall_s": r["seconds"], "tokens_per_s": r["new_tokens"] / r["seconds"],
                "p50_latency_s": r["seconds"], "p99_latency_s": r["seconds"], "p50_ttft_s": None,
                "ttft_source": None, "p50_ttft_client_s": None, "max_batch": args.jobs, "mean_batch": args.jobs,
                "polled": 0, "job_details": [],
            })

    def row(phase, engine):
        for r in rows:
            if r["phase"] == phase and r["engine"] == engine:
                return r
        return None

    ratios = []

    def ratio(label, phase, a, b, target, key="tokens_per_s"):
        ra, rb = row(phase, a), row(phase, b)
        if ra and rb and rb[key]:
            value = ra[key] / rb[key]
            ratios.append({"comparison": label, "value": value, "target": target,
                           "met": None if target is None else value >= target})

    ratio("greedy: continuous / batch-1 tok/s", "greedy", "continuous", "batch-1", 4.0)
    ratio("greedy: continuous / transformers tok/s", "greedy", "continuous", "transformers", 1.2)
    ratio("contrastive: continuous / batch-1 tok/s", "contrastive", "continuous", "batch-1", None)
    ratio("contrastive: continuous / transformers tok/s", "contrastive", "continuous", "transformers", 2.0)
    ratio("mixed: continuous / batch-1 tok/s", "mixed", "continuous", "batch-1", 3.0)
    ratio("greedy: streaming on / off tok/s", "greedy", "continuous", "no-stream", 0.9)
    mc, mb = row("mixed", "continuous"), row("mixed", "batch-1")
    if mc and mb:
        ratios.append({"comparison": "mixed: p99 latency, batch-1 / continuous",
                       "value": mb["p99_latency_s"] / mc["p99_latency_s"], "target": 1.0,
                       "met": mc["p99_latency_s"] < mb["p99_latency_s"]})

    # ---- report
    import torch  # noqa: E402 - only for its version (the venv's; the worker links the same libtorch)

    command = args.command or shlex.join([sys.executable, *sys.argv])
    machine = {"nproc": nproc(), "cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "max_batch_size_flag": svc.has_max_batch, "loadavg_before": load_before,
               "loadavg_after": loadavg(), "total_s": time.perf_counter() - started}
    order = {"greedy": 0, "contrastive": 1, "mixed": 2}
    engines = {"continuous": 0, "no-stream": 1, "batch-1": 2, "transformers": 3}
    rows.sort(key=lambda r: (order[r["phase"]], engines[r["engine"]]))

    def f(x, fmt="{:.2f}"):
        return "–" if x is None else fmt.format(x)

    print(f"Machine: {machine['cpu']}, nproc {machine['nproc']}; THREADS={args.threads} libtorch threads "
          f"(worker and transformers), float32, medium GPT-J (8 × 1024, random weights) in {args.model}; "
          f"torch {machine['torch']}. Load average before / after: {machine['loadavg_before']} / "
          f"{machine['loadavg_after']} (the ratios mean little on a busy machine); the run took "
          f"{machine['total_s']:.0f} s.")
    print()
    print(f"Command: `{command}`")
    print()
    print(f"Continuous: `{shlex.join(worker_cmds.get('continuous', []))}`  ")
    print(f"Batch-1: `{shlex.join(worker_cmds.get('batch-1', []))}`  ")
    print(f"No-stream: `{shlex.join(worker_cmds.get('no-stream', []))}`")
    if not svc.has_max_batch:
        print()
        print("**This worker has no `--max-batch-size`: the continuous rows ran it with its defaults.**")
    print()
    print("| workload | engine | jobs | new tokens | wall s | tok/s | p50 latency s | p99 latency s | "
          "p50 TTFT s | max batch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ttft = f(r["p50_ttft_s"]) + ("≈" if r["ttft_source"] == "prefill" else "")
        tokens = str(r["new_tokens"]) + ("" if not r["mismatched_jobs"] else f" ({r['mismatched_jobs']} jobs ≠ asked)")
        print(f"| {r['workload']} | {r['engine']} | {r['jobs']} | {tokens} | {r['wall_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {f(r['p50_latency_s'])} | {f(r['p99_latency_s'])} | {ttft} | "
              f"{f(r['max_batch'], '{}')} |")
    print()
    print("| comparison | ratio | target | met |")
    print("|---|---:|---:|---|")
    for q in ratios:
        target = "–" if q["target"] is None else (f"≥ {q['target']:g}×" if "p99" not in q["comparison"]
                                                  else "> 1× (lower p99)")
        met = "–" if q["met"] is None else ("yes" if q["met"] else "**no**")
        print(f"| {q['comparison']} | {q['value']:.2f}× | {target} | {met} |")
    print()
    print("Tokens/s: all new tokens of the phase over the time from its first submission to its last answer "
          "(transformers: the timed `generate` call of the whole batch, left-padded, after a warm-up call). "
          "Every job asks min_new_tokens = max_new_tokens, so each generates exactly what it asks; the counts "
          "are checked. Latency: client-side, submission to the final job record. TTFT: the server's, the "
          "job's wait in the broker (`queued_ms`) plus the worker's `time_to_first_token_ms` (≈: its prefill "
          "time, where the worker does not report one). Max batch: the largest running batch a job of the phase saw, as the "
          "worker reports it (– when it does not).")
    polled = sum(r["polled"] for r in rows)
    if polled:
        print()
        print(f"**{polled} jobs were timed by the {args.poll_ms} ms fallback poll, not by a completion notice; "
              "their latencies are that coarse.**")
    log(f"total time {time.perf_counter() - started:.0f} s")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": command, "worker_commands": worker_cmds, "rows": rows,
                       "ratios": ratios, "mixed_arrivals_s": arrivals}, fh, indent=2)


if __name__ == "__main__":
    main()
