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

With `--peer vllm`, vLLM's CPU build serves the same checkpoint directory beside our gateway and
continuous worker, and one client drives both through the OpenAI route: streamed
`POST /v1/completions`, greedy, min_tokens = max_tokens, (p1) JOBS concurrent jobs of TOKENS and (p2)
PEER_JOBS jobs arriving as a seeded Poisson process, each phase against one server and then the other.
Throughput, time to first token (to the first text chunk) and time per output token are the client's, the
same measure for both; peak memory is sampled from each server's processes.

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


# ---------------------------------------------------------------------------------------------------------
# The peer: vLLM's CPU build, and the OpenAI client that drives it and our gateway alike
# ---------------------------------------------------------------------------------------------------------

def check_for_vllm(model_dir):
    """vLLM loads a Hugging Face directory: config.json naming GPTJForCausalLM (vLLM's class of that name),
    safetensors weights (sharded, with their index) and tokenizer.json. `worker init-tiny-model` writes all
    of them; without a tokenizer_config.json, transformers takes the tokenizer class from the model type
    (GPT-2's, reading tokenizer.json: the prompt ids our worker uses, no BOS). Checked, not assumed, since
    the checkpoint directory may come from elsewhere (MODELS)."""
    missing = [n for n in ("config.json", "tokenizer.json") if not os.path.exists(os.path.join(model_dir, n))]
    if not any(n.endswith(".safetensors") for n in os.listdir(model_dir)):
        missing.append("*.safetensors")
    if missing:
        raise SystemExit(f"{model_dir} has no {', '.join(missing)}: vLLM cannot load it")
    arch = json.load(open(os.path.join(model_dir, "config.json"))).get("architectures") or []
    if "GPTJForCausalLM" not in arch:
        raise SystemExit(f"{model_dir}/config.json names {arch}, not GPTJForCausalLM")


def peer_env(venv_bin):
    """The environment of vLLM's processes: ours minus what points at the main venv's torch 2.11
    (LD_LIBRARY_PATH, set for tch, would load its libraries under vLLM's torch 2.13), offline (no model hub
    here), no usage reports."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "LIBTORCH_USE_PYTORCH", "LIBTORCH", "VIRTUAL_ENV",
                        "PYTHONPATH", "GPTJ_PYTHON")}
    main_bin = os.path.dirname(sys.executable)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and os.path.abspath(p) != main_bin]
    env.update(PATH=os.pathsep.join([venv_bin] + path), VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


class Vllm:
    """`vllm serve` of the bench's checkpoint in its own process group (its API server, engine core and
    worker), float32 like our worker, at most --max-batch-size running sequences like our worker, its
    OpenMP threads bound to the first THREADS CPUs."""

    def __init__(self, args):
        self.args = args
        self.base = f"http://127.0.0.1:{args.vllm_port}"
        self.proc = None
        os.makedirs(args.log_dir, exist_ok=True)
        self.log_path = os.path.join(args.log_dir, "vllm.log")
        self.cmd = []
        self.env_shown = {}

    def start(self):
        a = self.args
        self.cmd = [a.vllm, "serve", a.model, "--served-model-name", "medium", "--dtype", "float32",
                    "--max-num-seqs", str(a.max_batch_size), "--max-model-len", "2048",
                    "--host", "127.0.0.1", "--port", str(a.vllm_port), "--disable-uvicorn-access-log",
                    *shlex.split(a.vllm_args)]
        env = peer_env(os.path.dirname(a.vllm))
        # OMP threads: as many as our worker's libtorch threads, on the first CPUs this process may use.
        # Explicit, because vLLM's "auto" keeps one core of a 2-core machine for its scheduler process and
        # computes on the other.
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:max(1, a.threads)])
        self.env_shown = {"VLLM_CPU_KVCACHE_SPACE": str(a.vllm_kv_gib),
                          "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpus)}
        env.update(self.env_shown)
        log(f"starting vLLM: {' '.join(f'{k}={v}' for k, v in self.env_shown.items())} {shlex.join(self.cmd)}")
        out = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        http = Http(self.base)
        deadline = time.monotonic() + a.vllm_ready_timeout
        while True:
            if self.proc.poll() is not None:
                tail = open(self.log_path, errors="replace").read()[-4000:]
                raise SystemExit(f"vLLM's CPU build exited ({self.proc.returncode}) before serving; "
                                 f"{self.log_path}:\n{tail}")
            try:
                status, _ = http.request("GET", "/v1/models", timeout=2)
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"vLLM did not serve in {a.vllm_ready_timeout:.0f} s; see {self.log_path}")
            time.sleep(1)

    def pids(self):
        return [self.proc.pid] if self.proc else []

    def stop(self):
        if self.proc is None:
            return
        # The group: the API server and the engine core and worker processes it started.
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Its children may outlive the leader for a moment; the group goes with SIGKILL.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


class MemorySampler(threading.Thread):
    """The largest memory, summed over some processes and their descendants, seen once a second: PSS
    (shared pages split among the processes sharing them), so vLLM's three processes count their shared
    libraries once, as our worker's one process does; RSS where PSS cannot be read."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = 0
        self.kind = "PSS"
        self.stop_event = threading.Event()

    def sample(self):
        import psutil
        procs = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                procs += [p] + p.children(recursive=True)
            except psutil.Error:
                pass
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                try:
                    total += p.memory_info().rss
                    self.kind = "RSS"
                except psutil.Error:
                    pass
        self.peak = max(self.peak, total)

    def run(self):
        while True:
            self.sample()
            if self.stop_event.wait(1.0):
                return

    def finish(self):
        self.stop_event.set()
        self.join()
        self.sample()
        return self.peak


def completion_body(model, prompt, n):
    """Greedy, exactly n new tokens (min_tokens = max_tokens, as the other rows ask), streamed with the usage
    chunk last: the same body for both servers."""
    return {"model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def stream_completion(base, body, timeout):
    """One streamed `POST /v1/completions`: the client's clock at submission, at the first chunk carrying
    text, and at the end of the stream; the text and the usage's completion_tokens."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "accept": "text/event-stream"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{base}/v1/completions answered {r.status}: {r.read()[:500]!r}")
        first, text, tokens = None, [], None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"{base}: the stream carried an error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if first is None:
                        first = time.perf_counter()
                    text.append(choice["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
        t1 = time.perf_counter()
    finally:
        conn.close()
    return {"t0": t0, "first": first if first is not None else t1, "t1": t1, "text": "".join(text),
            "tokens": tokens}


def openai_phase(base, bodies, arrivals=None, timeout=600):
    """Streams the completions on one thread each: all released together, or at `arrivals` (seconds)."""
    results = [None] * len(bodies)
    errors = []
    go = threading.Event()
    start = time.perf_counter() + 0.2

    def one(i):
        try:
            go.wait()
            if arrivals is not None:
                delay = start + arrivals[i] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            results[i] = stream_completion(base, bodies[i], timeout)
        except Exception as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start - time.perf_counter()))
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def summarize_openai(key, title, engine, results, asked):
    """A row of the peer table: client-side figures only, the same for both servers."""
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    tokens = sum(r["tokens"] or 0 for r in results)
    ttft = [r["first"] - r["t0"] for r in results]
    lat = [r["t1"] - r["t0"] for r in results]
    # Time per output token after the first, per job (vLLM's benchmark's TPOT).
    tpot = [(r["t1"] - r["first"]) / (r["tokens"] - 1) for r in results if (r["tokens"] or 0) > 1]
    return {
        "phase": key, "workload": title, "engine": engine, "jobs": len(results), "new_tokens": tokens,
        "mismatched_jobs": sum((r["tokens"] or 0) != n for r, n in zip(results, asked, strict=True)),
        "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99),
        "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
        "p50_tpot_ms": percentile(tpot, 50) * 1000 if tpot else None,
        "texts": [r["text"] for r in results],
    }


def served_model(base):
    status, models = Http(base).request("GET", "/v1/models")
    if status != 200 or not (models or {}).get("data"):
        raise RuntimeError(f"{base}/v1/models answered {status}: {models}")
    return models["data"][0]["id"]


def run_peer_comparison(sides, plan, timeout):
    """The peer comparison: each phase against both servers in turn, the order reversed from one phase to
    the next (ABBA), so that a machine getting busier or quieter weighs on both. sides: (engine, base URL,
    process ids whose memory to sample)."""
    models = {}
    for engine, base, _ in sides:
        models[engine] = served_model(base)
        # Warm-up through the same route, excluded from the numbers.
        openai_phase(base, [completion_body(models[engine], PROMPTS[i], 4) for i in range(4)], timeout=timeout)
    rows, peaks = [], {}
    for i, (key, title, items, arrivals) in enumerate(plan):
        for engine, base, pids in (sides if i % 2 == 0 else sides[::-1]):
            log(f"{engine}: {title}")
            sampler = MemorySampler(pids)
            sampler.start()
            try:
                bodies = [completion_body(models[engine], p, n) for p, n in items]
                res = openai_phase(base, bodies, arrivals, timeout)
            finally:
                peaks[engine] = max(peaks.get(engine, 0), sampler.finish())
            rows.append(dict(summarize_openai(key, title, engine, res, [n for _, n in items]),
                             memory_kind=sampler.kind))
            r = rows[-1]
            log(f"  {r['new_tokens']} tokens in {r['wall_s']:.2f} s: {r['tokens_per_s']:.1f} tok/s, "
                f"p50 TTFT {r['p50_ttft_s']:.2f} s")
    for r in rows:
        r["peak_memory_mib"] = peaks[r["engine"]] / 2**20
    return rows


def peer_plan(args, prompts):
    """(key, title, [(prompt, tokens)], arrivals): JOBS concurrent greedy jobs of TOKENS (the same prompts
    as (a)), and PEER_JOBS greedy jobs arriving as a seeded Poisson process."""
    plan = [("peer-greedy", f"{args.jobs} × greedy, {args.tokens} tokens, at once",
             [(p, args.tokens) for p in prompts], None)]
    if args.peer_jobs:
        rng = random.Random(args.seed + 1)
        items, arrivals, t = [], [], 0.0
        for i in range(args.peer_jobs):
            if i:
                t += rng.expovariate(args.peer_rate)
            arrivals.append(t)
            items.append((PROMPTS[rng.randrange(len(PROMPTS))],
                          rng.randint(args.mixed_min_tokens, args.mixed_max_tokens)))
        mean = sum(n for _, n in items) / len(items)
        plan.append(("peer-poisson", f"{args.peer_jobs} × greedy, Poisson {args.peer_rate:g}/s, "
                     f"{args.mixed_min_tokens}..{args.mixed_max_tokens} tokens (offered "
                     f"{args.peer_rate * mean:.0f} tok/s)", items, arrivals))
    return plan


def peer_versions(args):
    """vllm-cpu's and its torch's versions, from vLLM's venv."""
    python = os.path.join(os.path.dirname(args.vllm), "python")
    code = ("import importlib.metadata as m; "
            "print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                         env=peer_env(os.path.dirname(args.vllm)))
    parts = out.stdout.split()
    return dict(zip(("vllm_cpu", "torch", "transformers"), parts)) if len(parts) == 3 else {}


def peer_report(args, peer, rows):
    """The peer section of the report: its table, our ratios to it, and whether the texts agree."""
    versions = peer_versions(args)
    labels = {"ours": "ours: gateway + continuous worker", "vllm": f"vLLM {versions.get('vllm_cpu', '?')} CPU"}

    def row(phase, engine):
        return next((r for r in rows if r["phase"] == phase and r["engine"] == engine), None)

    ratios = []
    for phase, label, key, flip, target in (
            ("peer-greedy", f"{args.jobs} × greedy: ours / vLLM tok/s", "tokens_per_s", False, 1.2),
            ("peer-poisson", "Poisson: p50 TTFT, vLLM / ours (> 1: ours shorter)", "p50_ttft_s", True, 1.0),
            ("peer-greedy", f"{args.jobs} × greedy: p50 TTFT, vLLM / ours", "p50_ttft_s", True, None)):
        ours, theirs = row(phase, "ours"), row(phase, "vllm")
        if ours and theirs and ours[key] and theirs[key]:
            value = theirs[key] / ours[key] if flip else ours[key] / theirs[key]
            ratios.append({"comparison": label, "value": value, "target": target,
                           "met": None if target is None else value >= target})
    ours, theirs = row("peer-greedy", "ours"), row("peer-greedy", "vllm")
    if ours and theirs:
        ratios.append({"comparison": "peak memory, vLLM / ours", "value":
                       theirs["peak_memory_mib"] / ours["peak_memory_mib"], "target": None, "met": None})
        same = sum(a == b for a, b in zip(ours["texts"], theirs["texts"], strict=True))
    else:
        same = None

    lines = []
    env = " ".join(f"{k}={v}" for k, v in peer.env_shown.items())
    lines.append(f"Peer: vLLM's CPU build (vllm-cpu {versions.get('vllm_cpu', '?')}, torch "
                 f"{versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}) on the same "
                 f"checkpoint: `{env} {shlex.join(peer.cmd)}`. Both servers are driven by the same client: "
                 "streamed `POST /v1/completions`, greedy (`temperature` 0), `min_tokens` = `max_tokens`, the same "
                 "prompts, one connection per job. Both were up together (ours: the continuous worker above, "
                 "before its other phases); each phase ran against one, then the other, the order reversed from "
                 "one phase to the next.")
    lines.append("")
    lines.append("| workload | server | jobs | new tokens | wall s | tok/s | p50 TTFT s | p99 TTFT s | p50 TPOT ms | "
                 "p50 latency s | p99 latency s | peak memory MiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["phase"], r["engine"] != "ours")):
        tokens = str(r["new_tokens"])
        if r["mismatched_jobs"]:
            tokens += f" ({r['mismatched_jobs']} jobs ≠ asked)"
        tpot = "–" if r["p50_tpot_ms"] is None else f"{r['p50_tpot_ms']:.1f}"
        lines.append(f"| {r['workload']} | {labels[r['engine']]} | {r['jobs']} | {tokens} | {r['wall_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['p50_ttft_s']:.2f} | {r['p99_ttft_s']:.2f} | {tpot} | "
                     f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {r['peak_memory_mib']:.0f} |")
    lines.append("")
    lines.append("| comparison | ratio | target | met |")
    lines.append("|---|---:|---:|---|")
    for q in ratios:
        target = "–" if q["target"] is None else f"≥ {q['target']:g}×"
        met = "–" if q["met"] is None else ("yes" if q["met"] else "**no**")
        lines.append(f"| {q['comparison']} | {q['value']:.2f}× | {target} | {met} |")
    lines.append("")
    kind = rows[0]["memory_kind"] if rows else "PSS"
    lines.append("All figures client-side. Tokens/s: the usage chunks' completion tokens over the time from the "
                 "first request to the last stream's end. TTFT: request to the first chunk carrying text. TPOT: a "
                 "job's time after its first text chunk over its tokens after the first. Peak memory: the "
                 f"largest {kind} sum seen (sampled each second) over the server's processes: ours the gateway "
                 "and the worker (RabbitMQ and Redis, shared services, not counted), vLLM's its API server, "
                 "engine core and worker.")
    if same is not None:
        lines.append("")
        lines.append(f"Same text from both servers for {same} of {len(ours['texts'])} greedy jobs (the same "
                     "weights and prompt ids; float32 kernels that differ may part ways where two logits "
                     "nearly tie).")
    data = {"versions": versions, "command": peer.cmd, "env": peer.env_shown, "ratios": ratios,
            "same_text_jobs": same,
            "rows": [{k: v for k, v in r.items() if k != "texts"} for r in rows]}
    return lines, data


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
    p.add_argument("--peer", choices=["", "vllm"], default="", help="also run this peer on the same "
                   "checkpoint, and the same OpenAI-route workload against it and our gateway")
    p.add_argument("--vllm", help="the `vllm` executable of vLLM's venv (--peer vllm)")
    p.add_argument("--vllm-port", type=int, default=18091)
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` flags")
    p.add_argument("--vllm-ready-timeout", type=float, default=900)
    p.add_argument("--peer-jobs", type=int, default=32, help="jobs of the peer's Poisson phase (0: none)")
    p.add_argument("--peer-rate", type=float, default=1.0, help="their mean arrivals per second")
    p.add_argument("--command", help="the command line to print (the shell wrapper passes its own)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    if args.hf_child:
        hf_child(json.load(sys.stdin))
        return
    for req in ("worker", "gateway", "model"):
        if not getattr(args, req):
            p.error(f"--{req} is required")
    if args.peer == "vllm" and not args.vllm:
        p.error("--peer vllm needs --vllm")
    args.contrastive_tokens = args.contrastive_tokens or args.tokens
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    load_before = loadavg()

    if not os.path.exists(os.path.join(args.model, "config.json")):
        log(f"writing the medium checkpoint to {args.model}")
        subprocess.run([args.worker, "init-tiny-model", args.model, "--preset", "medium"], check=True,
                       stdout=subprocess.DEVNULL)
    if args.peer == "vllm":
        check_for_vllm(args.model)

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

    plan = peer_plan(args, prompts) if args.peer else []
    peer = Vllm(args) if args.peer == "vllm" else None
    peer_rows, rows, hf = [], [], None
    svc = Service(args)
    # (name, max batch, extra flags, phases it runs): the streaming-off worker repeats (a) only.
    configs = [("continuous", args.max_batch_size, [], None), ("batch-1", 1, [], None)]
    if "greedy" not in skip and "stream" not in skip:
        configs.append(("no-stream", args.max_batch_size, ["--stream-tokens", "0"], {"greedy"}))
    worker_cmds = {}
    try:
        # The peer starts first, so that a peer that cannot start here fails the run before anything else;
        # it then waits, idle, until our continuous worker is up, and goes once the comparison is done.
        if peer:
            peer.start()
        if not args.skip_transformers and phases:
            log("transformers: batched generate (warm-up call first)")
            hf = run_transformers(args, prompts, [{"strategy": s, "tokens": n} for _, _, s, n in phases])
        svc.start_gateway()
        for name, max_batch, extra, only in configs:
            runs_peer = bool(plan) and name == "continuous"
            runs_phases = [k for k, *_ in phases if only is None or k in only]
            if not runs_peer and not runs_phases and not (mixed and only is None):
                continue  # every phase of this configuration skipped
            worker_cmds[name] = svc.start_worker(name, max_batch, extra)
            # Warm-up through the whole path: a few short jobs of each strategy, excluded from the numbers.
            warm = [job_body(PROMPTS[i], s, 4, seed=i) for s in ("greedy", "contrastive", "sample")
                    for i in range(min(4, max(1, args.jobs)))]
            run_phase(svc, warm)
            if runs_peer:
                sides = [("vllm", peer.base, peer.pids()),
                         ("ours", svc.base, [svc.gateway.pid, svc.worker.pid])]
                peer_rows = run_peer_comparison(sides, plan, args.job_timeout)
                peer.stop()
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
        if peer:
            peer.stop()
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
    print("  \n".join(f"{name.capitalize()}: `{shlex.join(cmd)}`" for name, cmd in worker_cmds.items()))
    if not svc.has_max_batch:
        print()
        print("**This worker has no `--max-batch-size`: the continuous rows ran it with its defaults.**")
    print()
    peer_data = None
    if peer_rows:
        lines, peer_data = peer_report(args, peer, peer_rows)
        print("\n".join(lines))
        print()
    if not rows:
        log(f"total time {time.perf_counter() - started:.0f} s")
        write_json(args, machine, command, worker_cmds, rows, ratios, arrivals, peer_data)
        return
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
    write_json(args, machine, command, worker_cmds, rows, ratios, arrivals, peer_data)


def write_json(args, machine, command, worker_cmds, rows, ratios, arrivals, peer):
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": command, "worker_commands": worker_cmds, "rows": rows,
                       "ratios": ratios, "mixed_arrivals_s": arrivals, "peer": peer}, fh, indent=2)


if __name__ == "__main__":
    main()
