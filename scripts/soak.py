"""The soak under faults behind scripts/soak.sh (run that, not this).

Starts 2 gateways and 3 workers on the tiny model in a namespace of its own, drives JOBS jobs through them
(HTTP `POST /v1/jobs` + polls, synchronous `POST /run`, and AMQP publishes straight to `{ns}.jobs` with a
durable reply queue of its own), and meanwhile SIGKILLs a random worker every few seconds (restarting it),
restarts RabbitMQ once (`rabbitmqctl stop_app` / `start_app`) and SIGKILLs and restarts one gateway once.
Then a checker in the spirit of Jepsen's total-queue check compares what clients were told with what they
saw in the end, and what the workers' logs say they ran:

- accepted: `POST /v1/jobs` answered 202; `POST /run` answered with a result, an error of the job, or 504
  with the job id; an AMQP publish the broker confirmed. Refusals (503, 429, a nack or a returned message)
  are counted apart and retried as new jobs, and so are submissions cut off by a fault (no answer: the
  client cannot know; the checker finds out afterwards from the job records, by the job's unique prompt);
- lost: accepted and without a final state the client can see (a poll, the `/run` answer, a final AMQP
  reply) once the drain deadline has passed;
- answered twice: an AMQP correlation id with two final replies, or a job whose final state changed between
  polls (or whose `/run` answer is not the state its record holds);
- run twice: a job that more than one worker run started (the workers' `job started` log lines, less the
  ones answered from a worker's memory), each classified: the documented at-least-once case is a run cut
  off by its worker's death or its broker connection's loss, then redelivered.

And it fails on whatever else it cannot explain: an HTTP answer outside the ones a well-formed request can
get (`Load.unexplained`); a job record in its namespace it did not submit (foreign), or one of a submission
it was refused (a ghost), or an accepted HTTP job without a record there (it landed on a gateway not the
soak's); an AMQP reply for an id it never got accepted; a text that differs between the views of one job
(the client's answer, the record, the event log, the streamed tokens); a panic in any process's log; a
gateway or worker that exited without being told to.

Before it starts anything it refuses a PORT that already answers, and a gateway counts as ready only when
the socket listening on its port is that gateway process's own. On any exit, SIGTERM, SIGINT and SIGHUP
included, it stops every process it started; it leads a process group of its own, so that scripts/soak.sh
can end whatever a SIGKILL of this process would leave.

Prints a plain-text table; exits 1 when a check failed, 2 when the setup failed (a port taken, say), 128 +
the signal's number when interrupted.
"""

import argparse
import atexit
import collections
import dataclasses
import hashlib
import http.client
import json
import os
import queue
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import datetime

import pika
import pika.exceptions

FINAL_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")


def log(msg):
    print(f"--- [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Small clients: HTTP (keep-alive per thread and gateway), Redis (RESP, for the final scan)
# ---------------------------------------------------------------------------------------------------------


class CutOff(Exception):
    """No answer: the connection failed or closed before a response (the request may or may not have run)."""


class NotSent(Exception):
    """The connection was refused: the request never reached a gateway."""


class Http:
    def __init__(self):
        self.local = threading.local()

    def request(self, port, method, path, body=None, timeout=30.0):
        conns = getattr(self.local, "conns", None)
        if conns is None:
            conns = self.local.conns = {}
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        conn = conns.get(port)
        if conn is not None and conn.sock is not None and dropped(conn.sock):
            # The gateway closed this kept-alive connection while it was idle (its header-read timeout):
            # a request sent on it would fail unsent-looking, as a cut-off. A new connection instead, as
            # urllib3 does.
            conn.close()
            conn = None
        if conn is None:
            conn = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        sent = False
        try:
            conn.request(method, path, body=data, headers=headers)
            sent = True
            r = conn.getresponse()
            raw = r.read()
        except ConnectionRefusedError as e:
            conn.close()
            conns.pop(port, None)
            raise NotSent(str(e)) from e
        except (http.client.HTTPException, OSError) as e:
            conn.close()
            conns.pop(port, None)
            # A request that could not be written whole never ran (a kept-alive connection to a gateway
            # that died, say). One written whole and never answered may have: that one is cut off.
            if not sent:
                raise NotSent(f"{type(e).__name__}: {e}") from e
            raise CutOff(f"{type(e).__name__}: {e}") from e
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return r.status, parsed


def dropped(sock):
    """Whether an idle kept-alive socket was closed by its peer: readable with nothing sent means EOF (or
    bytes nobody asked for; either way the connection is not fit for another request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Resp:
    """A minimal Redis client: enough for SCAN and pipelined HGETALL."""

    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=30)
        self.f = self.sock.makefile("rb")
        if u.password:
            user = urllib.parse.unquote(u.username) if u.username else None
            pw = urllib.parse.unquote(u.password)
            self.call(*(("AUTH", user, pw) if user else ("AUTH", pw)))
        db = (u.path or "/").strip("/")
        if db:
            self.call("SELECT", db)

    @staticmethod
    def _cmd(*parts):
        out = [f"*{len(parts)}\r\n".encode()]
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode()
            out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
        return b"".join(out)

    def _read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return self.f.read(n + 2)[:-2].decode(errors="replace")
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        return rest.decode()

    def call(self, *parts):
        self.sock.sendall(self._cmd(*parts))
        return self._read()

    def pipeline(self, cmds):
        self.sock.sendall(b"".join(self._cmd(*c) for c in cmds))
        return [self._read() for _ in cmds]

    def scan(self, pattern):
        cursor, keys = "0", []
        while True:
            cursor, batch = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(batch)
            if cursor == "0":
                return keys

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------
# Whose port is it: a TCP connect before the start, /proc's socket tables after
# ---------------------------------------------------------------------------------------------------------


def port_answers(port):
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def listening_inodes(port):
    """The inodes of the sockets listening on TCP `port`, any address, from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    # 0A is TCP_LISTEN; the local address is HEXADDR:HEXPORT.
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def socket_inodes(pid):
    """The inodes of the sockets process `pid` holds (its /proc/PID/fd links read `socket:[INODE]`)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


class Interrupted(Exception):
    """A signal asked the soak to stop: raised in the main thread, so that its `finally` stops every process."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------------
# The processes: gateways, workers, the broker
# ---------------------------------------------------------------------------------------------------------


class FaultLog:
    """What every cluster the soak drives keeps for its checker: the faults and when, the workers killed, the
    broker's outages, the `/run` requests open on each gateway; and its logs (filled by the cluster)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.faults = []  # (time, kind, target)
        self.killed = {}  # worker incarnation -> time of its SIGKILL
        self.broker_windows = []  # (stop time, started again time)
        self.worker_logs = []  # (incarnation, path)
        self.gateway_logs = []
        self.t_load = time.time()
        self.open_runs = collections.defaultdict(dict)  # port -> {request: when it was sent}
        # Faults only containers have (scripts/compose-faults.sh); the soak of processes leaves them empty.
        self.windows = collections.defaultdict(list)  # worker id -> [(from, to, how)]: paused or cut off
        self.store_losses = []  # [Redis removed, empty Redis up (None while it is not)]

    def running(self, port, token, opened):
        with self.lock:
            if opened:
                self.open_runs[port][token] = time.monotonic()
            else:
                self.open_runs[port].pop(token, None)

    def fault(self, kind, target):
        t = time.time()
        with self.lock:
            self.faults.append((t, kind, target))
        log(f"fault: {kind} {target}")
        return t


class Cluster(FaultLog):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.gateways = {}  # index -> Popen
        self.workers = {}  # index -> (Popen, incarnation name)
        self.incarnations = collections.Counter()
        self.broker_stopped = False
        self.ports = {}
        self.http = Http()
        # Every process started, live or not, with its incarnation name: what stop_all ends, and what the
        # checker asks whether it exited on its own. A process the soak killed is in `asked`.
        self.procs = []  # (Popen, name)
        self.asked = set()  # the processes (Popen) the soak signalled
        self.failures = []  # what went wrong with a process outside the main thread (a restart that failed)
        self.closed = False  # set once the soak stops: no process starts after that

    def port(self, i):
        if self.args.port:
            return self.args.port + i
        if i not in self.ports:
            # Free ports, so that soaks running side by side do not collide. Chosen once: a gateway restarts
            # on its port.
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.ports[i] = sock.getsockname()[1]
        return self.ports[i]

    def start_gateway(self, i):
        a = self.args
        self.incarnations[f"g{i}"] += 1
        name = f"g{i}.{self.incarnations[f'g{i}']}"
        cmd = [a.gateway, "--listen", f"127.0.0.1:{self.port(i)}", "--namespace", a.namespace,
               "--amqp-url", a.amqp_url, "--redis-url", a.redis_url,
               "--submit-rate-limit", "1000000000/1s", "--read-rate-limit", "1000000000/1s",
               "--max-run-waits-per-client", "100000", "--run-timeout-s", str(a.run_timeout),
               "--shutdown-grace-s", "5"]
        env = dict(os.environ, RUST_LOG=os.environ.get("GATEWAY_RUST_LOG", "info"), NO_COLOR="1")
        path = os.path.join(a.log_dir, f"gateway-{name}.log")
        with self.lock:
            self.check_open()
            self.gateway_logs.append(path)
            with open(path, "w") as out:
                p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            self.procs.append((p, f"gateway {name}"))
            self.gateways[i] = p

    def check_open(self):
        """Refuses to start a process once the soak is stopping (a fault thread's restart, racing stop_all)."""
        if self.closed:
            raise RuntimeError("the soak is stopping; no process starts now")

    def wait_gateway(self, i, timeout=60):
        """Until gateway i answers /readyz 200 on its port, and that port's listener is its own."""
        deadline = time.monotonic() + timeout
        port = self.port(i)
        while time.monotonic() < deadline and not self.closed:
            p = self.gateways[i]
            if p.poll() is not None:
                raise SystemExit(f"gateway {i} exited ({p.returncode}); see {self.args.log_dir}")
            try:
                status, _ = self.http.request(port, "GET", "/readyz", timeout=2)
            except (CutOff, NotSent):
                status = None
            if status == 200:
                # Whoever answered: a process that took the port first (another soak given the same PORT)
                # answers while this gateway fails to bind it, and the soak's jobs would land there.
                listeners = listening_inodes(port)
                if listeners and listeners <= socket_inodes(p.pid):
                    return
                raise SystemExit(f"port {port} answers, but its listener is not gateway {i} (pid {p.pid}): "
                                 "another process holds the port (another soak given the same PORT?)")
            time.sleep(0.1)
        raise SystemExit(f"gateway {i} did not become ready in {timeout} s")

    def start_worker(self, i):
        a = self.args
        self.incarnations[f"w{i}"] += 1
        name = f"soak-w{i}.{self.incarnations[f'w{i}']}"
        cmd = [a.worker, "serve", "--model", a.model, "--threads", "1", "--namespace", a.namespace,
               "--amqp-url", a.amqp_url, "--worker-id", name, "--max-batch-size", str(a.max_batch_size)]
        env = dict(os.environ, RUST_LOG=os.environ.get("WORKER_RUST_LOG", "info"), LOG_FORMAT="json")
        path = os.path.join(a.log_dir, f"worker-{name}.log")
        with self.lock:
            self.check_open()
            with open(path, "w") as out:
                p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            self.procs.append((p, f"worker {name}"))
            self.workers[i] = (p, name)
            self.worker_logs.append((name, path))

    def wait_worker(self, i, timeout=120):
        p, name = self.workers[i]
        path = os.path.join(self.args.log_dir, f"worker-{name}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise SystemExit(f"worker {name} exited ({p.returncode}); see {path}")
            with open(path, errors="replace") as fh:
                if "consuming jobs" in fh.read():
                    return
            time.sleep(0.1)
        raise SystemExit(f"worker {name} did not start consuming in {timeout} s; see {path}")

    def run_waiting_at(self, i, for_s):
        """Whether a POST /run has been waiting on gateway i for `for_s` seconds (so it holds a job)."""
        now = time.monotonic()
        with self.lock:
            return any(now - t >= for_s for t in self.open_runs[self.port(i)].values())

    def consuming(self, i):
        p, name = self.workers[i]
        if p.poll() is not None:
            return False
        try:
            with open(os.path.join(self.args.log_dir, f"worker-{name}.log"), errors="replace") as fh:
                return "consuming jobs" in fh.read()
        except OSError:
            return False

    def kill_worker(self, i):
        p, name = self.workers[i]
        self.asked.add(p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        t = self.fault("SIGKILL worker", name)
        with self.lock:
            self.killed[name] = t

    def kill_gateway(self, i):
        p = self.gateways[i]
        self.asked.add(p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.fault("SIGKILL gateway", f"g{i}.{self.incarnations[f'g{i}']}")

    def restart_broker(self):
        t0 = self.fault("rabbitmqctl stop_app", "rabbit")
        self.broker_stopped = True
        # By default the one broker's application; against a cluster (scripts/cluster.sh) the command that
        # stops the node leading the jobs queue.
        subprocess.run(self.args.broker_stop_cmd, shell=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=120)
        time.sleep(self.args.broker_down_s)
        self.broker_start()
        t1 = self.fault("rabbitmqctl start_app", "rabbit")
        self.broker_windows.append((t0, t1))

    def broker_start(self):
        if self.broker_stopped:
            subprocess.run(self.args.broker_start_cmd, shell=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT, timeout=300)
            self.broker_stopped = False

    def exited_unasked(self):
        """The processes that ended though the soak never signalled them: [(name, exit status)]."""
        with self.lock:
            procs = list(self.procs)
        return [(name, p.returncode) for p, name in procs if p.poll() is not None and p not in self.asked]

    def process_failed(self, what):
        if not self.closed:
            with self.lock:
                self.failures.append(what)
            log(f"FAILED: {what}")

    def stop_all(self):
        """Stops every process the soak started (SIGTERM, then SIGKILL after 30 s); no new one starts after.
        Safe to call again: the signal handler's exit, the main thread's `finally` and atexit all do."""
        with self.lock:
            self.closed = True
            procs = [p for p, _ in self.procs if p.poll() is None]
        for p in procs:
            self.asked.add(p)
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------------------------------------
# Jobs and what clients saw of them
# ---------------------------------------------------------------------------------------------------------


class Job:
    """One logical job: submitted (in one or more attempts, each a job of its own) until one is accepted."""

    def __init__(self, k, channel, params, cancel, due):
        self.k = k
        self.channel = channel  # "http", "run" or "amqp"
        self.params = params
        self.cancel = cancel
        self.due = due
        self.attempts = []  # (attempt prompt, outcome: refused-503 / cut-off / accepted / ...)
        self.accepted = None  # the attempt's prompt
        self.accepted_at = None  # when it was accepted (time.time())
        self.id = None  # the job id of the accepted attempt, when the client knows it
        self.final = None  # first final state the client saw: (status, detail)
        self.finals = []  # every final observation (AMQP: distinct final replies)
        self.run_status = None  # the /run HTTP status
        self.run_text = None
        self.record_gone = False  # its last poll answered 404 after Redis lost its data

    def prompt(self, attempt):
        return f"Soak job {self.k} try {attempt} once upon a time"


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.by_prompt = {}  # attempt prompt -> (job, outcome)
        self.unexplained = []  # HTTP answers no documented case covers: {call, status, k, body}

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def attempt(self, job, prompt, outcome):
        """Records one submission attempt; an accepted one becomes the job's (`job.accepted`)."""
        with self.lock:
            job.attempts.append((prompt, outcome))
            self.by_prompt[prompt] = (job, outcome)
            self.counts[f"{job.channel}:{outcome}"] += 1
            if outcome == "accepted":
                job.accepted = prompt
                job.accepted_at = time.time()

    def unexplained_answer(self, job, call, status, body):
        """An answer the soak cannot explain (see `Load`): counted, and a failure of the run."""
        with self.lock:
            self.unexplained.append({"call": call, "status": status, "k": job.k, "body": str(body)[:300]})
        log(f"job {job.k}: {call} answered {status}, which no documented case explains: {body}")

    def know(self, job, job_id):
        with self.lock:
            job.id = job_id

    def final(self, job, status, detail, via):
        with self.lock:
            job.finals.append((status, detail, via, time.time()))
            if job.final is None:
                job.final = (status, detail)


def before_store_loss(cluster, job):
    """Whether `job` was accepted before Redis last came back empty (scripts/compose-faults.sh restarts it so):
    its record, and with it the result of a job that had ended, may be gone (docs/deployment.md)."""
    # A loss still under way (its end not known yet) counts up to now.
    return job.accepted_at is not None and any(end is None or job.accepted_at <= end
                                               for _, end in cluster.store_losses)


def http_final(record):
    """(status, detail) of a polled job record, or None while it is not final."""
    status = record.get("status")
    if status not in FINAL_STATUSES:
        return None
    if status == "succeeded":
        return status, (record.get("result") or {}).get("text")
    return status, ((record.get("error") or {}).get("code"))


class Load:
    """The clients. Each call knows the answers it can explain, the ones the API documents
    (gateway/src/routes) for a well-formed request from a client without keys, under rate limits set out of
    reach: `POST /v1/jobs` 202, or 429 and 503 (refused, retried); `POST /run` 200, 504 with the job id,
    the job's own error (409 cancelled, 422, 500, 504 expired), or 429 and 503; `GET` and `DELETE
    /v1/jobs/{id}` 200, or 429 and 503. Any other answer, documented or not (a 400, a 404 for an id a
    gateway gave out, a 500 `internal`), goes to `Ledger.unexplained_answer` and fails the run."""

    def __init__(self, args, cluster, ledger):
        self.args = args
        self.cluster = cluster
        self.ledger = ledger
        self.http = Http()
        self.stop = threading.Event()
        self.poll_lock = threading.Lock()
        self.to_poll = {}  # job id -> job
        self.rng_lock = threading.Lock()
        self.rng = random.Random(args.seed + 1)

    def gateway_order(self):
        with self.rng_lock:
            ports = [self.cluster.port(i) for i in range(self.args.gateways)]
            self.rng.shuffle(ports)
        return ports

    def wait_due(self, due):
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def post(self, job, prompt, port, path, body, timeout):
        """One submission attempt: (status, body), or None when it was not sent or was cut off (the ledger
        records which, and the caller tries again)."""
        try:
            return self.http.request(port, "POST", path, body, timeout=timeout)
        except NotSent:
            self.ledger.attempt(job, prompt, "not-sent")
        except CutOff as e:
            self.ledger.attempt(job, prompt, "cut-off")
            log(f"job {job.k}: POST {path} cut off ({e})")
        time.sleep(0.05)
        return None

    def submit(self, job, path, timeout, waits=False):
        """Submits `job` to POST `path`, a new attempt (and prompt) after each one not sent, cut off or
        refused (429/503, counted apart), until a gateway answers otherwise: (prompt, status, body), or None
        once the load stops. With `waits` (a /run), the request counts as waiting on its gateway while open."""
        attempt = 0
        while not self.stop.is_set():
            attempt += 1
            prompt = job.prompt(attempt)
            port = self.gateway_order()[0]
            body = {"prompt": prompt, "parameters": job.params}
            if waits:
                token = object()
                self.cluster.running(port, token, True)
                try:
                    answer = self.post(job, prompt, port, path, body, timeout)
                finally:
                    self.cluster.running(port, token, False)
            else:
                answer = self.post(job, prompt, port, path, body, timeout)
            if answer is None:
                continue
            status, resp = answer
            if status == 504 and isinstance(resp, dict) and resp.get("code") == "outcome_unknown":
                # Redis did not answer while the gateway recorded the job: it may or may not have been taken,
                # as a submission cut off. A new attempt follows; the checker finds out from the records.
                self.ledger.attempt(job, prompt, "cut-off")
                self.ledger.count(f"{job.channel}:outcome unknown (504), retried")
                time.sleep(0.2)
                continue
            if status in (429, 503):
                self.ledger.attempt(job, prompt, f"refused-{status}")
                self.ledger.count(f"refusal message: {status} {(resp or {}).get('message')}")
                time.sleep(0.2)
                continue
            return prompt, status, resp
        return None

    def accept(self, job, prompt, job_id=None):
        """The attempt `prompt` accepted; with the job id the client was told, polled to its end."""
        self.ledger.attempt(job, prompt, "accepted")
        if job_id is not None:
            self.ledger.know(job, job_id)
            with self.poll_lock:
                self.to_poll[job_id] = job

    # HTTP: POST /v1/jobs, then polls ------------------------------------------------------------------

    def submit_http(self, job):
        answer = self.submit(job, "/v1/jobs", 30)
        if answer is None:
            return
        prompt, status, resp = answer
        if status == 202:
            self.accept(job, prompt, resp["id"])
            if job.cancel:
                time.sleep(random.uniform(0, 0.2))
                self.cancel_http(job)
            return
        self.ledger.attempt(job, prompt, f"unexpected-{status}")
        self.ledger.unexplained_answer(job, "POST /v1/jobs", status, resp)

    def cancel_http(self, job):
        for _ in range(50):
            for port in self.gateway_order():
                try:
                    status, resp = self.http.request(port, "DELETE", f"/v1/jobs/{job.id}", timeout=30)
                except (NotSent, CutOff):
                    continue
                if status == 200:
                    self.ledger.count("http:cancel requests answered")
                    return
                if status == 404 and before_store_loss(self.cluster, job):
                    self.ledger.count("http:cancels answered 404 after Redis lost its data")
                    return
                if status not in (503, 429):
                    self.ledger.unexplained_answer(job, "DELETE /v1/jobs/{id}", status, resp)
                    return
            time.sleep(0.2)

    def poller(self):
        """Polls every accepted HTTP job until it is final, then keeps polling it now and then to see that
        its final state never changes."""
        while not self.stop.is_set():
            with self.poll_lock:
                pending = list(self.to_poll.items())
            if not pending:
                time.sleep(0.1)
                continue
            started = time.monotonic()
            for job_id, job in pending:
                if self.stop.is_set():
                    return
                self.poll_once(job_id, job)
            # Each pending job about every POLL_S seconds.
            rest = self.args.poll_s - (time.monotonic() - started)
            if rest > 0:
                time.sleep(rest)

    def poll_once(self, job_id, job):
        for port in self.gateway_order():
            try:
                status, rec = self.http.request(port, "GET", f"/v1/jobs/{job_id}", timeout=10)
            except (NotSent, CutOff):
                continue
            self.ledger.count("http:polls")
            if status == 200:
                job.record_gone = False
                fin = http_final(rec)
                if fin is not None:
                    self.ledger.final(job, fin[0], fin[1], "poll")
                    with self.poll_lock:
                        self.to_poll.pop(job_id, None)
                return rec
            if status == 404 and before_store_loss(self.cluster, job):
                # Its record went with Redis' data: a queued or running job's comes back with its worker's
                # next reply; an ended job's result is gone (docs/deployment.md). Polled on either way.
                self.ledger.count("http:polls answered 404 after Redis lost its data")
                job.record_gone = True
                return None
            if status not in (503, 429):
                # A 404 too: the id came from a gateway of this namespace, whose records outlive the soak.
                self.ledger.unexplained_answer(job, "GET /v1/jobs/{id}", status, rec)
            return None
        return None

    # HTTP: POST /run -----------------------------------------------------------------------------------

    def submit_run(self, job):
        answer = self.submit(job, "/run", self.args.run_timeout + 30, waits=True)
        if answer is None:
            return
        prompt, status, resp = answer
        job.run_status = status
        code = resp.get("code") if isinstance(resp, dict) else None
        if status == 200:
            self.accept(job, prompt)
            job.run_text = resp
            self.ledger.count("run:answered 200")
            self.ledger.final(job, "succeeded", resp, "run")
            return
        if status == 504 and isinstance(resp, dict) and resp.get("job_id"):
            # Past the run timeout: the job goes on; poll it to its end.
            self.accept(job, prompt, resp["job_id"])
            self.ledger.count("run:answered 504, polled on")
            return
        if status in (409, 500, 504, 422) and code in ("cancelled", "delivery_limit", "expired", "rejected",
                                                         "generation_failed", "context_overflow"):
            # The job ran (or the broker gave up on it) and this is its final answer.
            self.accept(job, prompt)
            self.ledger.count(f"run:answered {status} {code}")
            self.ledger.final(job, "cancelled" if code == "cancelled" else "failed", code, "run")
            return
        self.ledger.attempt(job, prompt, f"unexpected-{status}")
        self.ledger.unexplained_answer(job, "POST /run", status, resp)

    def http_pool(self, q):
        while True:
            job = q.get()
            if job is None:
                return
            self.wait_due(job.due)
            try:
                (self.submit_run if job.channel == "run" else self.submit_http)(job)
            except Exception as e:  # noqa: BLE001 - counted; the checker reports the job
                log(f"job {job.k}: client error {type(e).__name__}: {e}")
                self.ledger.count(f"{job.channel}:client errors")


class AmqpClient(threading.Thread):
    """Publishes the AMQP jobs with confirms and collects every reply on a durable queue of its own, across
    broker restarts (reconnecting, re-consuming; a reply redelivered to us is recognised by its bytes)."""

    def __init__(self, args, ledger, jobs):
        super().__init__(daemon=True)
        self.args = args
        self.ledger = ledger
        self.jobs = collections.deque(jobs)
        self.by_id = {}  # attempt id (the correlation id) -> job
        self.prompts = {}  # attempt id -> the prompt it carried
        self.reply_queue = f"{args.namespace}.soak.replies"
        self.conn = None
        self.ch = None
        self.seen = set()  # digests of reply messages already taken
        self.replies = collections.defaultdict(list)  # correlation id -> [(type, body, time)]
        self.cancels = []  # (due, job)
        self.done_publishing = threading.Event()
        self.stop = threading.Event()
        self.error = None

    def connect(self):
        while not self.stop.is_set():
            try:
                # A cluster's URLs: pika tries them in turn.
                params = broker_params(self.args.amqp_url)
                for p in params:
                    p.heartbeat = 10
                    p.blocked_connection_timeout = 30
                self.conn = pika.BlockingConnection(params)
                self.ch = self.conn.channel()
                self.ch.confirm_delivery()
                # Quorum, as the service's own queues: replicated, so a cluster's node stopped does not take
                # it away (a classic queue lives on one node and is gone while that node is).
                self.ch.queue_declare(self.reply_queue, durable=True, arguments={"x-queue-type": "quorum"})
                self.ch.basic_qos(prefetch_count=200)
                self.ch.basic_consume(self.reply_queue, self.on_reply, auto_ack=False)
                return
            except pika.exceptions.AMQPError as e:
                self.ledger.count("amqp:connect failures")
                log(f"amqp: cannot connect ({type(e).__name__}); retrying")
                self.close()
                time.sleep(0.5)

    def close(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001 - the connection is gone either way
            pass
        self.conn = self.ch = None

    def on_reply(self, ch, method, props, body):
        digest = hashlib.sha256((props.type or "").encode() + b"\0" + (props.correlation_id or "").encode()
                                + b"\0" + body).hexdigest()
        if digest in self.seen:
            self.ledger.count("amqp:replies redelivered to us (same message)")
        else:
            self.seen.add(digest)
            cid = props.correlation_id
            job = self.by_id.get(cid)
            self.ledger.count(f"amqp:replies {props.type}")
            # A reply for an id the soak never published is kept too: the checker reports it (foreign).
            self.replies[cid].append((props.type, body, time.time()))
            # Only the accepted attempt's answer is the job's: an earlier attempt left unconfirmed may be
            # answered too (its own prompt and text; the checker counts it with the cut-off submissions).
            # Its id is known by now: pika runs this callback only in process_data_events, never inside the
            # publish that waits for the confirm.
            if job is not None and cid == job.id:
                if props.type in FINAL_EVENTS:
                    reply = json.loads(body)
                    if props.type == "job.succeeded":
                        detail = reply.get("text")
                    elif props.type == "job.failed":
                        detail = (reply.get("error") or {}).get("code")
                    else:
                        detail = None
                    self.ledger.final(job, props.type[4:], detail, "amqp")
        ch.basic_ack(method.delivery_tag)

    def publish(self, attempt_id, body):
        props = pika.BasicProperties(correlation_id=attempt_id, message_id=attempt_id, reply_to=self.reply_queue,
                                     content_type="application/json", delivery_mode=2)
        self.ch.basic_publish("", f"{self.args.namespace}.jobs", json.dumps(body).encode(), props, mandatory=True)

    def publish_cancel(self, job):
        body = json.dumps({"version": 1, "job_id": job.id}).encode()
        props = pika.BasicProperties(type="job.cancel", content_type="application/json", delivery_mode=2,
                                     timestamp=int(time.time()))
        self.ch.basic_publish(f"{self.args.namespace}.control", "", body, props, mandatory=True)

    def run(self):
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
            log(f"amqp: client failed: {type(e).__name__}: {e}")

    def _run(self):
        import uuid

        self.connect()
        current = None  # (job, attempt number)
        while not self.stop.is_set():
            try:
                now = time.monotonic()
                if current is None and self.jobs and self.jobs[0].due <= now:
                    current = (self.jobs.popleft(), 0)
                if current is not None:
                    job, n = current
                    n += 1
                    current = (job, n)
                    attempt_id = str(uuid.uuid4())
                    prompt = job.prompt(n)
                    body = {"version": 1, "prompt": prompt, "parameters": job.params,
                            "submitted_at_ms": int(time.time() * 1000)}
                    self.by_id[attempt_id] = job
                    self.prompts[attempt_id] = prompt
                    try:
                        self.publish(attempt_id, body)
                    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
                        self.ledger.attempt(job, attempt_id, f"refused-{type(e).__name__}")
                        time.sleep(0.2)
                        continue
                    except pika.exceptions.AMQPError:
                        # No confirm: the broker may or may not have the job. A new attempt follows.
                        self.ledger.attempt(job, attempt_id, "cut-off")
                        raise
                    self.ledger.attempt(job, attempt_id, "accepted")
                    self.ledger.know(job, attempt_id)
                    if job.cancel:
                        self.cancels.append((time.monotonic() + random.uniform(0, 0.2), job))
                    current = None
                    if not self.jobs:
                        self.done_publishing.set()
                while self.cancels and self.cancels[0][0] <= time.monotonic():
                    _, job = self.cancels.pop(0)
                    try:
                        self.publish_cancel(job)
                        self.ledger.count("amqp:cancels published")
                    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
                        # Right after a broker restart the cancellations stream may not be routable yet.
                        self.ledger.count(f"amqp:cancels returned ({type(e).__name__}), retried")
                        self.cancels.append((time.monotonic() + 0.2, job))
                        break
                self.conn.process_data_events(time_limit=0.01 if current is None else 0)
                if not self.jobs and current is None:
                    self.done_publishing.set()
            except pika.exceptions.AMQPError as e:
                log(f"amqp: connection lost ({type(e).__name__}: {e}); reconnecting")
                self.ledger.count("amqp:reconnects")
                self.close()
                time.sleep(0.2)
                self.connect()
        self.close()

    def delete_queue(self):
        try:
            conn = pika.BlockingConnection(broker_params(self.args.amqp_url))
            conn.channel().queue_delete(self.reply_queue)
            conn.close()
        except Exception as e:  # noqa: BLE001 - the shell's cleanup tries again
            log(f"could not delete {self.reply_queue}: {e}")



def broker_params(urls):
    """pika connection parameters for a comma-separated list of AMQP URLs (a cluster's nodes)."""
    return [pika.URLParameters(u.strip()) for u in urls.split(",") if u.strip()]

# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------


def run_faults(args, cluster, load_s, stop):
    rng = random.Random(args.seed + 2)
    t0 = time.monotonic()
    plan = []
    if args.broker_restart:
        plan.append((args.broker_at * load_s, "broker", None))
    if args.gateway_restart:
        plan.append((args.gateway_at * load_s, "gateway", args.gateways - 1))
    t = rng.uniform(0.5, 1.0) * args.kill_every
    kills = 0
    while t < load_s and (args.max_kills < 0 or kills < args.max_kills):
        plan.append((t, "worker", None))
        kills += 1
        t += rng.uniform(0.5, 1.5) * args.kill_every
    plan.sort(key=lambda p: p[0])
    slow = []
    for at, kind, target in plan:
        while not stop.is_set() and time.monotonic() - t0 < at:
            time.sleep(0.05)
        if stop.is_set():
            break  # the restarts under way finish first: a broker left stopped would fail the cleanup
        if kind == "worker":
            # A worker that is taking jobs (one still starting would test less), at random.
            ready = [i for i in range(args.workers) if cluster.consuming(i)]
            if not ready:
                continue
            i = rng.choice(ready)
            cluster.kill_worker(i)
            time.sleep(args.restart_delay_s)
            try:
                cluster.start_worker(i)
            except (OSError, RuntimeError) as e:
                cluster.process_failed(f"worker {i} did not restart: {e}")
                break
        else:
            # The broker's and the gateway's restarts take seconds: worker kills go on meanwhile.
            th = threading.Thread(target=restart_gateway if kind == "gateway" else restart_broker,
                                  args=(args, cluster, target), daemon=True)
            th.start()
            slow.append(th)
    for th in slow:
        th.join()


def restart_gateway(args, cluster, i):
    # Killed while a /run waits on it, when one does within 10 s: that client gets no answer and never learns
    # its job's id, and the job must still end (the checker finds it by its prompt).
    deadline = time.monotonic() + 10
    while not cluster.run_waiting_at(i, 0.05) and time.monotonic() < deadline:
        time.sleep(0.005)
    cluster.kill_gateway(i)
    time.sleep(args.restart_delay_s)
    try:
        cluster.start_gateway(i)
        cluster.wait_gateway(i)
    except (OSError, RuntimeError, SystemExit) as e:
        # A thread's SystemExit would end only the thread, silently: the checker reports it instead.
        cluster.process_failed(f"gateway {i} did not come back: {e}")
        return
    cluster.fault("gateway ready", f"g{i}")


def restart_broker(args, cluster, _):
    cluster.restart_broker()


# ---------------------------------------------------------------------------------------------------------
# The workers' logs
# ---------------------------------------------------------------------------------------------------------


def parse_ts(s):
    # 2026-12-01T12:49:39.541842Z
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def read_worker_logs(cluster):
    """Per job id: fresh runs [(incarnation, start, done or None)], answers from memory, redeliveries; per
    incarnation: the times it lost the broker."""
    runs = collections.defaultdict(list)
    memory = collections.defaultdict(list)
    redelivered = collections.Counter()
    lost_broker = collections.defaultdict(list)
    for name, path in cluster.worker_logs:
        open_runs = {}
        pending_memory = set()
        try:
            fh = open(path, errors="replace")
        except OSError:
            continue
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            f = rec.get("fields") or {}
            msg = f.get("message", "")
            ts = parse_ts(rec.get("timestamp"))
            job = f.get("job")
            if msg == "job seen before; answering from its earlier generation":
                pending_memory.add(job)
                memory[job].append((name, ts))
            elif msg == "job started":
                if f.get("redelivered"):
                    redelivered[job] += 1
                if job in pending_memory:
                    pending_memory.discard(job)
                else:
                    run = [name, ts, None]
                    runs[job].append(run)
                    open_runs[job] = run
            elif msg == "job done":
                if job in open_runs:
                    open_runs.pop(job)[2] = ts
            elif job in open_runs and ("returning the job to the queue" in msg or "goes back to the queue" in msg):
                # By design: the worker gave the job back (its final reply refused or not confirmed in time, or
                # its engine given up on); another run follows.
                open_runs.pop(job).append(msg)
            elif msg.startswith("broker connection lost") or msg.startswith("broker connection ended"):
                lost_broker[name].append(ts)
        fh.close()
    for rs in runs.values():
        rs.sort(key=lambda run: run[1] or 0)
    return runs, memory, redelivered, lost_broker


def read_panics(cluster):
    """Every `panicked at` line in the logs of the processes the soak started (Rust's panic message, on
    stderr, which goes to the same log): [(log file, line)]. No fault the soak injects explains one."""
    panics = []
    for path in cluster.gateway_logs + [path for _, path in cluster.worker_logs]:
        try:
            with open(path, errors="replace") as fh:
                name = os.path.basename(path)
                panics += [(name, ANSI.sub("", line).strip()) for line in fh if "panicked at" in line]
        except OSError:
            continue
    return panics


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_gateway_logs(cluster):
    """Job ids whose publish a gateway left unconfirmed and republished: two copies may have landed."""
    republished = set()
    for path in cluster.gateway_logs:
        try:
            with open(path, errors="replace") as fh:
                for line in fh:
                    line = ANSI.sub("", line)
                    if "publish unconfirmed" in line or "unconfirmed job republished" in line:
                        republished.update(UUID.findall(line))
        except OSError:
            continue
    return republished


def cut_off(name, after, cluster, lost_broker, within=None):
    """What first cut incarnation `name` off at or after `after` (within `within` s, if given): its SIGKILL,
    or its broker connection's loss (its log says so, or the broker restart began). None if nothing did."""
    if after is None:
        return None
    causes = []
    killed = cluster.killed.get(name)
    if killed is not None:
        causes.append((killed, "SIGKILLed"))
    causes += [(t, "lost the broker") for t in lost_broker.get(name, []) if t is not None]
    causes += [(a, "lost the broker") for a, _ in cluster.broker_windows]
    causes = [(t, how) for t, how in causes if t >= after - 0.01 and (within is None or t - after <= within)]
    # Faults that last (scripts/compose-faults.sh: a container paused, or cut from the broker's network): a
    # run in flight while one lasted was cut off by it, whenever it began.
    for a, b, how in cluster.windows.get(name, []):
        if b >= after - 0.01 and (within is None or a - after <= within):
            causes.append((max(a, after), how))
    return min(causes)[1] if causes else None


def classify_run(run, answered_by, cluster, lost_broker, republished=False):
    """Why a job ran again after this run: the documented at-least-once cases, or `unexplained`."""
    name, start, done = run[:3]
    if len(run) > 3:
        return f"its worker gave it back: {run[3]}"
    if done is not None and republished and cut_off(name, done, cluster, lost_broker, within=5) is None:
        return "a second copy: its gateway republished an unconfirmed publish"
    if done is None:
        how = cut_off(name, start, cluster, lost_broker)
        if how is None:
            return "unexplained (the run never finished)"
        if name in answered_by:
            # Its final reply reached the client, but the worker died before its acknowledgement did.
            return f"answered, then its worker {how} before the ack"
        return f"its worker {how} mid-job"
    how = cut_off(name, done, cluster, lost_broker, within=5)
    if how is not None:
        return f"answered, then its worker {how} before the ack landed"
    return "unexplained (answered and acknowledged, then run again)"


# ---------------------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------------------


def make_jobs(args):
    rng = random.Random(args.seed)
    jobs = []
    start = time.monotonic() + 0.5
    weights = [("http", args.http_share), ("run", args.run_share), ("amqp", args.amqp_share)]
    for k in range(args.jobs):
        channel = rng.choices([w[0] for w in weights], [w[1] for w in weights])[0]
        # Mostly short jobs, and a share of long ones: workers are then killed mid-job more often, and a
        # /run is open on the gateway when it is killed.
        if rng.random() < args.long_share:
            n = rng.randint(args.max_tokens, args.long_tokens)
        else:
            n = rng.randint(args.min_tokens, args.max_tokens)
        strategy = rng.choices(["greedy", "sample", "contrastive"], [0.5, 0.25, 0.25])[0]
        params = {"strategy": strategy, "max_new_tokens": n}
        if strategy == "sample":
            params["seed"] = rng.randrange(1 << 30)
        # /run waits for the answer: its cancel is the client hanging up, not exercised here.
        cancel = channel != "run" and rng.random() < args.cancel_share
        jobs.append(Job(k, channel, params, cancel, start + k / args.rate))
    return jobs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--worker", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--port", type=int, default=0, help="gateway i listens on PORT + i (0: free ports)")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="jobs submitted per second")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--long-share", type=float, default=0.1, help="share of jobs of MAX_TOKENS..LONG_TOKENS")
    p.add_argument("--long-tokens", type=int, default=160)
    p.add_argument("--http-share", type=float, default=0.4)
    p.add_argument("--run-share", type=float, default=0.2)
    p.add_argument("--amqp-share", type=float, default=0.4)
    p.add_argument("--cancel-share", type=float, default=0.03)
    p.add_argument("--run-timeout", type=int, default=2, help="the gateways' --run-timeout-s (short, so that "
                   "/run calls around the faults time out, answer 504 with the job id and are polled on)")
    p.add_argument("--poll-s", type=float, default=0.5)
    p.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between worker SIGKILLs")
    p.add_argument("--max-kills", type=int, default=-1)
    p.add_argument("--restart-delay-s", type=float, default=0.5)
    p.add_argument("--broker-restart", type=int, default=1)
    p.add_argument("--broker-at", type=float, default=0.4, help="fraction of the load phase")
    p.add_argument("--broker-down-s", type=float, default=1.0)
    p.add_argument("--broker-stop-cmd", default="rabbitmqctl stop_app", help="shell command of the broker fault")
    p.add_argument("--broker-start-cmd", default="rabbitmqctl start_app", help="shell command that ends it")
    p.add_argument("--gateway-restart", type=int, default=1)
    p.add_argument("--gateway-at", type=float, default=0.7)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--settle-s", type=float, default=3.0, help="wait for late duplicate replies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", type=int, default=0, help="1: a documented second AMQP final reply fails too")
    p.add_argument("--http-threads", type=int, default=16)
    p.add_argument("--command", help="the command line to print")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.port:
        # Two soaks given one PORT: the second's gateways cannot bind, its jobs go to the first's gateways,
        # and both runs are wrong. Refuse before anything starts.
        taken = [args.port + i for i in range(args.gateways) if port_answers(args.port + i)]
        if taken:
            print(f"soak: refusing to start: port {', '.join(map(str, taken))} already answers on 127.0.0.1 "
                  f"(another soak or service?); the gateways take PORT..PORT+{args.gateways - 1}: choose "
                  "another PORT, or leave it out for free ports", file=sys.stderr, flush=True)
            return 2
    os.makedirs(args.log_dir, exist_ok=True)
    # Leads a process group, which every gateway and worker joins: scripts/soak.sh ends the group, so that a
    # SIGKILL of this process (which no handler sees) leaves nothing running either.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader already (run by hand from a terminal): its children are its group's anyway

    started = time.time()
    cluster = Cluster(args)
    atexit.register(cluster.stop_all)
    # SIGTERM, SIGINT, SIGHUP: raised in the main thread as Interrupted, so that the `finally` below stops
    # every process; one arriving while that cleanup runs is only logged (the cleanup must finish).
    cleaning = threading.Event()

    def on_signal(signum, _frame):
        if cleaning.is_set():
            log(f"{signal.Signals(signum).name}: already stopping every process the soak started")
            return
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    ledger = Ledger()

    def await_workers():
        for i in range(args.workers):
            cluster.wait_worker(i)

    try:
        log(f"namespace {args.namespace}: starting {args.gateways} gateways and {args.workers} workers "
            f"(logs in {args.log_dir})")
        for i in range(args.gateways):
            cluster.start_gateway(i)
        for i in range(args.workers):
            cluster.start_worker(i)
        for i in range(args.gateways):
            cluster.wait_gateway(i)
        await_workers()
        outcome = load_and_drain(args, cluster, ledger, run_faults, await_workers)
    finally:
        cleaning.set()
        cluster.broker_start()  # never leave the broker stopped
        log("stopping the gateways and workers")
        cluster.stop_all()
        cleaning.clear()
    return verdict(args, cluster, ledger, outcome, started)


@dataclasses.dataclass
class Outcome:
    """What a load left to check: the jobs and what their clients saw, the job records and event logs at the
    end, and when the load was submitted and drained."""

    jobs: list
    amqp: "AmqpClient"
    records: dict
    started_events: dict
    streamed: dict
    repolled: dict
    submitted_s: float
    drained_s: float


def load_and_drain(args, cluster, ledger, faults_fn, await_workers, drained=lambda open_jobs: not open_jobs):
    """The load against `cluster`, with `faults_fn(args, cluster, load_s, stop)` breaking it meanwhile; then the
    drain: every accepted job to a final state its client sees (or `drained(open jobs)` says there is
    nothing more to wait for), every record of a submission cut off to its end, a last look at every HTTP
    job, and the records and event logs read. Its clients and fault thread are stopped on any exit; the
    cluster is the caller's to stop."""
    jobs = make_jobs(args)
    load_s = args.jobs / args.rate
    log(f"{args.jobs} jobs over {load_s:.0f} s ({args.rate:g}/s), faults meanwhile")
    load = Load(args, cluster, ledger)
    amqp = AmqpClient(args, ledger, [j for j in jobs if j.channel == "amqp"])
    http_q = queue.Queue()
    for j in jobs:
        if j.channel != "amqp":
            http_q.put(j)
    pool = [threading.Thread(target=load.http_pool, args=(http_q,), daemon=True) for _ in range(args.http_threads)]
    for _ in pool:
        http_q.put(None)
    poller = threading.Thread(target=load.poller, daemon=True)
    fault_stop = threading.Event()
    faults = threading.Thread(target=faults_fn, args=(args, cluster, load_s, fault_stop), daemon=True)
    t_load = time.monotonic()
    cluster.t_load = time.time()
    try:
        amqp.start()
        for t in pool + [poller]:
            t.start()
        faults.start()

        # Load, then drain: every accepted job to a final state the client sees.
        for t in pool:
            t.join()
        amqp.done_publishing.wait()
        submitted_s = time.monotonic() - t_load
        log(f"all jobs submitted after {submitted_s:.0f} s; waiting for the faults to end")
        faults.join()
        await_workers()
        log("draining")
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            if drained([j for j in jobs if j.accepted is not None and j.final is None]):
                break
            time.sleep(0.25)
        drained_s = time.monotonic() - t_load
        # Jobs whose submission was cut off: the records say whether they were taken, and they must end too.
        redis = Resp(args.redis_url)
        while True:
            records = scan_records(redis, args.namespace)
            orphans_open = [r for r in records.values()
                            if r.get("status") not in FINAL_STATUSES
                            and (ledger.by_prompt.get(r.get("prompt")) or (None, None))[1] != "accepted"]
            if not orphans_open or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if orphans_open:
            log("records of submissions not accepted, not final at the drain's end: "
                f"{[(r.get('status'), r.get('worker_id'), r.get('prompt')) for r in orphans_open][:20]}")
        time.sleep(args.settle_s)
        # A last look at every HTTP job: a final state must not have changed.
        repolled = {}
        for job in jobs:
            if job.channel in ("http", "run") and job.id is not None:
                rec = load.poll_once(job.id, job)
                if rec is not None:
                    repolled[job.id] = rec
        records = scan_records(redis, args.namespace)
        started_events, streamed = scan_events(redis, args.namespace, records)
        redis.close()
    finally:
        load.stop.set()
        fault_stop.set()
        if faults.is_alive():
            faults.join(120)  # a restart under way finishes first: a broker left stopped would fail the cleanup
        amqp.stop.set()
        amqp.join(10)
        amqp.delete_queue()
    return Outcome(jobs=jobs, amqp=amqp, records=records, started_events=started_events, streamed=streamed,
                   repolled=repolled, submitted_s=submitted_s, drained_s=drained_s)


def verdict(args, cluster, ledger, outcome, started, **extra):
    """Checks what `load_and_drain` left against the workers' logs and the replies, prints the table (and
    the JSON), and returns the exit status: 1 when a check failed."""
    runs, memory, redelivered, lost_broker = read_worker_logs(cluster)
    # A worker killed between its job.started reply and its log line leaves a run only the replies show.
    for job_id, starts in outcome.started_events.items():
        add_starts(runs, job_id, starts)
    for cid, replies in outcome.amqp.replies.items():
        starts = []
        for t, b, _ in replies:
            if t == "job.started":
                body = json.loads(b)
                starts.append((body.get("worker_id"), (body.get("started_at_ms") or 0) / 1000.0))
        add_starts(runs, cid, starts)
    report = check(args, cluster, ledger, outcome.jobs, outcome.amqp, outcome.records, outcome.started_events,
                   outcome.streamed, outcome.repolled, runs, memory, redelivered, lost_broker)
    report["timing"] = {"submitted_s": outcome.submitted_s, "drained_s": outcome.drained_s,
                        "total_s": time.time() - started}
    report.update(extra)
    print_report(args, report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 1 if failed(args, report) else 0


# The checks of what the soak cannot explain: report key -> the heading its entries print under.
UNEXPLAINED = {
    "unexplained_answers": "HTTP ANSWERS NO DOCUMENTED CASE EXPLAINS",
    "foreign_records": "FOREIGN JOB RECORDS",
    "ghost_records": "GHOST JOB RECORDS",
    "accepted_without_record": "ACCEPTED WITHOUT A RECORD HERE",
    "stray_replies": "AMQP REPLIES TO IDS NOT PUBLISHED OR NOT ACCEPTED",
    "texts_differ": "RESULTS THAT DIFFER BETWEEN VIEWS",
    "panics": "PANICS",
    "processes_failed": "PROCESSES THAT EXITED UNASKED OR DID NOT RESTART",
}


def failed(args, r):
    return bool(r["lost"] or r["answered_twice"] or r["run_twice_unexplained"] or r["cut_off_not_ended"]
                or any(r[key] for key in UNEXPLAINED)
                or (args.strict and r["answered_twice_documented"]))


def scan_events(redis, ns, records):
    """Every job's event log, by job id: its `started` entries [(worker id, started at)], and the text its
    `token` entries add up to (what a client of `/v1/jobs/{id}/events` was streamed)."""
    ids = list(records)
    starts_by_id = {}
    streamed = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk:chunk + 500]
        for job_id, entries in zip(part, redis.pipeline([("XRANGE", f"{ns}:events:{i}", "-", "+") for i in part])):
            starts = []
            texts = []
            for _, flat in entries or []:
                fields = dict(zip(flat[0::2], flat[1::2]))
                if fields.get("event") not in ("started", "token"):
                    continue
                try:
                    data = json.loads(fields.get("data") or "{}")
                except ValueError:
                    continue
                if fields["event"] == "started":
                    starts.append((data.get("worker_id"), (data.get("started_at_ms") or 0) / 1000.0))
                else:
                    texts.append(data.get("text") or "")
            if starts:
                starts_by_id[job_id] = starts
            streamed[job_id] = "".join(texts)
    return starts_by_id, streamed


def add_starts(runs, job_id, starts):
    """Adds the runs that started replies show and the workers' logs do not (one run per incarnation)."""
    have = {run[0] for run in runs.get(job_id, [])}
    added = False
    for worker, at in starts:
        if worker and worker not in have:
            runs[job_id].append([worker, at, None])
            have.add(worker)
            added = True
    if added:
        runs[job_id].sort(key=lambda run: run[1] or 0)


def scan_records(redis, ns):
    keys = redis.scan(f"{ns}:job:*")
    records = {}
    for chunk in range(0, len(keys), 500):
        part = keys[chunk:chunk + 500]
        for key, flat in zip(part, redis.pipeline([("HGETALL", k) for k in part])):
            if not flat:
                continue
            rec = dict(zip(flat[0::2], flat[1::2]))
            records[key.rsplit(":", 1)[1]] = rec
    return records


def record_final(rec):
    status = rec.get("status")
    if status not in FINAL_STATUSES:
        return None
    if status == "succeeded":
        try:
            return status, json.loads(rec.get("result") or "{}").get("text")
        except ValueError:
            return status, None
    try:
        return status, (json.loads(rec.get("error") or "{}") or {}).get("code")
    except ValueError:
        return status, None


def check(args, cluster, ledger, jobs, amqp, records, started_events, streamed, repolled, runs, memory,
          redelivered, lost_broker):
    r = {"namespace": args.namespace, "jobs": len(jobs)}
    channels = ("http", "run", "amqp")
    accepted = [j for j in jobs if j.accepted is not None]
    r["accepted"] = {c: sum(j.channel == c for j in accepted) for c in channels}
    r["not_accepted"] = [j.k for j in jobs if j.accepted is None]

    # Final states by kind, as the client saw them first.
    finals = collections.Counter()
    for j in accepted:
        if j.final is None:
            continue
        status, detail = j.final
        kind = status if status in ("succeeded", "cancelled") else f"{status} ({detail})"
        finals[(j.channel, kind)] += 1
    r["finals"] = {f"{c}|{k}": n for (c, k), n in sorted(finals.items())}

    lost = [j for j in accepted if j.final is None]
    # An HTTP job accepted before Redis came back empty, never seen final and without a record now: its
    # record, and its result if it had ended, went with Redis' data, as docs/deployment.md says a Redis
    # without persistence loses them (its client is answered 404). Counted apart from the jobs lost for no
    # documented reason; the process soak never empties Redis.
    gone = [j for j in lost if j.channel != "amqp" and before_store_loss(cluster, j) and j.id not in records]
    lost = [j for j in lost if j not in gone]
    r["lost_with_store"] = len(gone)
    r["lost_with_store_jobs"] = [{"k": j.k, "channel": j.channel, "id": j.id} for j in gone]
    r["lost"] = len(lost)
    r["lost_jobs"] = [{"k": j.k, "channel": j.channel, "id": j.id, "attempts": j.attempts} for j in lost]

    # The job records by prompt (an attempt's prompt is unique): what became of each HTTP submission.
    # A record that a worker's reply made again after Redis lost its data has no prompt (docs/deployment.md):
    # it is the job's whose id the client was told, or, when no client was told it, one cut off.
    prompt_by_id = {j.id: j.accepted for j in accepted if j.channel != "amqp" and j.id is not None}
    recreated = [i for i, rec in records.items() if not rec.get("prompt")]
    r["records_recreated"] = len(recreated)
    by_prompt = {}
    ids_by_prompt = collections.defaultdict(list)
    for i, rec in records.items():
        prompt = rec.get("prompt") or prompt_by_id.get(i)
        if prompt is None and cluster.store_losses:
            continue  # recreated, and its client never learnt its id: a submission cut off (counted above)
        if prompt:
            by_prompt[prompt] = (i, rec)
        ids_by_prompt[prompt].append(i)

    # Answered twice: two final answers for one job. An AMQP producer can get a second final reply in the
    # case docs/amqp.md documents (a worker cut off after its final reply, before its acknowledgement
    # reached the broker: the job is redelivered and answered again); every other one is a failure, and
    # so is a job whose final state changed between polls.
    twice = []
    twice_documented = []
    for j in accepted:
        if j.channel == "amqp":
            fin = [(t, json.loads(b)) for t, b, _ in amqp.replies.get(j.id, []) if t in FINAL_EVENTS]
            if len(fin) > 1:
                first_worker = fin[0][1].get("worker_id")
                first_run = next((run for run in runs.get(j.id, []) if run[0] == first_worker), None)
                finished = (fin[0][1].get("finished_at_ms") or 0) / 1000.0
                how = None
                if first_run is not None and len(first_run) > 3:
                    how = f"gave it back: {first_run[3]}"
                elif first_run is not None and first_run[2] is None:
                    how = cut_off(first_worker, finished - 1, cluster, lost_broker, within=10)
                same = len({(t, b.get("text"), json.dumps(b.get("error"))) for t, b in fin}) == 1
                entry = {"k": j.k, "channel": "amqp", "id": j.id, "finals": [t for t, _ in fin],
                         "workers": [b.get("worker_id") for _, b in fin], "same_answer": same,
                         "first_worker": how, "finished_at": [b.get("finished_at_ms") for _, b in fin]}
                (twice_documented if how is not None and same else twice).append(entry)
        else:
            seen = {(s, d) for s, d, _, _ in j.finals}
            rec = repolled.get(j.id)
            if rec is not None and http_final(rec) is not None:
                seen.add(http_final(rec))
            if j.channel == "run" and j.run_status == 200:
                # The /run answer is a success: its record must say so too (its text is compared below).
                rec_id, run_rec = by_prompt.get(j.accepted, (None, None))
                fin = record_final(run_rec) if rec_id else None
                if fin is not None and fin[0] != "succeeded":
                    twice.append({"k": j.k, "channel": "run", "id": rec_id, "run_answer": j.run_text,
                                  "record": fin})
                continue
            if len(seen) > 1:
                twice.append({"k": j.k, "channel": j.channel, "id": j.id, "finals": sorted(map(str, seen))})
    r["answered_twice"] = len(twice)
    r["answered_twice_jobs"] = twice
    r["answered_twice_documented"] = len(twice_documented)
    r["answered_twice_documented_jobs"] = twice_documented

    # Texts: every view of one job's result must agree. HTTP: the client's text (its first final poll, or
    # `/run`'s answer less the prompt), the record's `result`, and what the job's event log streamed (its
    # token entries; the final reply appends the rest); AMQP: every `job.token` reply is the final text's
    # bytes at its `text_offset` (streamed texts are a prefix of the final text, docs/amqp.md). And the
    # result's prompt is the one the client sent: a text of another job's is no answer to this one.
    differ = []
    for j in accepted:
        if j.final is None or j.final[0] != "succeeded":
            continue
        text = j.final[1] or ""
        if j.channel == "amqp":
            replies = [(t, json.loads(b)) for t, b, _ in amqp.replies.get(j.id, [])]
            first = next(b for t, b in replies if t == "job.succeeded")
            views = {"reply": text}
            if first.get("prompt") != amqp.prompts.get(j.id):
                views["reply's prompt"] = first.get("prompt")
            final = text.encode()
            for n, (t, b) in enumerate(replies):
                chunk = (b.get("text") or "").encode()
                at = b.get("text_offset") or 0
                if t == "job.token" and final[at:at + len(chunk)] != chunk:
                    views[f"token reply {n} at byte {at}"] = b.get("text")
            if len(views) > 1:
                differ.append({"k": j.k, "channel": "amqp", "id": j.id, "views": views})
            continue
        hit = by_prompt.get(j.accepted)
        if hit is None:
            continue  # no record here: reported below
        rec_id, rec = hit
        fin = record_final(rec)
        if fin is None or fin[0] != "succeeded":
            continue  # a final state other than the client's: answered twice, above
        if j.channel == "run" and j.run_status == 200:
            run_text = j.run_text if isinstance(j.run_text, str) else ""
            text = run_text[len(j.accepted):] if run_text.startswith(j.accepted) else run_text
        try:
            result_prompt = json.loads(rec.get("result") or "{}").get("prompt")
        except ValueError:
            result_prompt = None
        views = {"client": text, "record": fin[1] or ""}
        if not before_store_loss(cluster, j):
            # A job alive across Redis' loss lost the start of its event log with it.
            views["event log"] = streamed.get(rec_id)
        if len(set(views.values())) > 1 or result_prompt != j.accepted:
            views["record's prompt"] = result_prompt
            differ.append({"k": j.k, "channel": j.channel, "id": rec_id, "views": views})
    r["texts_differ"] = differ

    # What the soak cannot account for in its own namespace. A record whose prompt it never sent is foreign
    # (another client's; or one a reply created for a job no gateway admitted: no prompt). One of a
    # submission that was refused or never sent is a ghost (a refusal withdraws the record), and so is a
    # second record of one prompt, or a record whose id is not the one its client was told. Every accepted
    # HTTP job needs its record here: without one, a gateway that is not the soak's took it. The replies on
    # the soak's own queue likewise: each for an AMQP publish the broker confirmed (or left unconfirmed).
    foreign = []
    ghosts = []
    for prompt, ids in ids_by_prompt.items():
        job, outcome = ledger.by_prompt.get(prompt, (None, None))
        if job is None:
            foreign += [{"id": i, "prompt": prompt} for i in ids]
        elif outcome not in ("accepted", "cut-off"):
            ghosts += [{"id": i, "k": job.k, "submission": outcome} for i in ids]
        elif len(ids) > 1:
            ghosts.append({"ids": ids, "k": job.k, "why": "several records of one submission"})
        elif outcome == "accepted" and job.id is not None and ids[0] != job.id:
            ghosts.append({"id": ids[0], "k": job.k, "why": f"the client was told id {job.id}"})
    r["foreign_records"] = foreign
    r["ghost_records"] = ghosts
    r["accepted_without_record"] = [{"k": j.k, "channel": j.channel, "id": j.id} for j in accepted
                                    if j.channel != "amqp" and j.accepted not in ids_by_prompt
                                    and not before_store_loss(cluster, j)]
    stray = []
    for cid, replies in amqp.replies.items():
        job, outcome = ledger.by_prompt.get(cid, (None, None)) if cid in amqp.by_id else (None, None)
        if job is None or outcome not in ("accepted", "cut-off"):
            stray.append({"correlation_id": cid, "k": job.k if job else None, "submission": outcome,
                          "replies": [t for t, _, _ in replies]})
    r["stray_replies"] = stray

    # Submissions cut off by a fault: did the gateway take them, and did they end?
    cut = collections.Counter()
    cut_lost = []
    for j in jobs:
        for prompt, outcome in j.attempts:
            if outcome != "cut-off":
                continue
            if j.channel == "amqp":
                fin = [t for t, _, _ in amqp.replies.get(prompt, []) if t in FINAL_EVENTS]
                cut["amqp: unconfirmed, answered anyway" if fin else "amqp: unconfirmed, no reply"] += 1
                continue
            hit = by_prompt.get(prompt)
            if hit is None:
                cut[f"{j.channel}: never recorded"] += 1
            elif record_final(hit[1]) is not None:
                cut[f"{j.channel}: taken, ended {hit[1].get('status')}"] += 1
            else:
                cut[f"{j.channel}: taken, NOT ended"] += 1
                cut_lost.append({"k": j.k, "id": hit[0], "status": hit[1].get("status")})
    r["cut_off"] = dict(cut)
    r["cut_off_not_ended"] = cut_lost
    r["refusals"] = {k: v for k, v in sorted(ledger.counts.items()) if "refused" in k}
    r["counts"] = dict(sorted(ledger.counts.items()))

    # Run twice by workers: from the workers' logs, by job id (records map HTTP prompts to ids).
    ids = {}
    for j in accepted:
        if j.channel == "amqp":
            ids[j.id] = j
        else:
            hit = by_prompt.get(j.accepted)
            if hit is not None:
                ids[hit[0]] = j
    republished = read_gateway_logs(cluster)
    r["republished_by_a_gateway"] = len(republished)
    twice_run = collections.Counter()
    twice_jobs = []
    multi = 0
    for job_id, rs in runs.items():
        if len(rs) < 2:
            continue
        multi += 1
        j = ids.get(job_id)
        answered_by = set()
        if j is not None and j.channel == "amqp":
            answered_by = {json.loads(b).get("worker_id") for t, b, _ in amqp.replies.get(job_id, [])
                           if t in FINAL_EVENTS}
        elif job_id in records:
            answered_by = {records[job_id].get("worker_id")}
        reasons = [classify_run(run, answered_by, cluster, lost_broker, job_id in republished) for run in rs[:-1]]
        for reason in reasons:
            twice_run[reason] += 1
        twice_jobs.append({"id": job_id, "k": j.k if j else None, "runs": len(rs), "reasons": reasons,
                           "workers": [x[0] for x in rs]})
    r["run_twice"] = multi
    r["run_twice_reasons"] = dict(twice_run)
    r["run_twice_unexplained"] = sum(n for k, n in twice_run.items() if k.startswith("unexplained"))
    r["run_twice_jobs"] = twice_jobs
    r["answered_from_memory"] = sum(len(v) for v in memory.values())
    r["redelivered_starts"] = sum(redelivered.values())
    r["jobs_run"] = len(runs)
    attempts = collections.Counter()
    over = []
    for job_id, rec in records.items():
        n = int(rec.get("attempts") or 0)
        attempts[n] += 1
        # `attempts` counts the job.started replies the record took: more than the worker processes that
        # started the job means one reply counted twice (a reply redelivered to a gateway, say).
        workers = [run[0] for run in runs.get(job_id, [])]
        logged = started_events.get(job_id, [])
        if n > len(workers):
            over.append({"id": job_id, "attempts": n, "runs": workers,
                         "started_events": [w for w, _ in logged], "status": rec.get("status")})
    r["record_attempts"] = {str(k): v for k, v in sorted(attempts.items())}
    r["records_attempts_over_runs"] = over

    # /run calls answered.
    run_jobs = [j for j in jobs if j.channel == "run"]
    r["run_calls"] = {
        "calls": sum(len(j.attempts) for j in run_jobs),
        "answered with the result (200)": sum(j.run_status == 200 and j.accepted is not None for j in run_jobs),
        "answered 504, polled to the end": ledger.counts.get("run:answered 504, polled on", 0),
        "answered with the job's error": sum(v for k, v in ledger.counts.items()
                                             if k.startswith("run:answered ") and " 200" not in k
                                             and "504, polled" not in k),
        "refused (429/503)": sum(v for k, v in ledger.counts.items() if k.startswith("run:refused")),
        "cut off by a fault": ledger.counts.get("run:cut-off", 0),
        "not sent (gateway down)": ledger.counts.get("run:not-sent", 0),
    }
    r["faults"] = [(round(t - cluster.t_load, 1), k, tgt)
                   for t, k, tgt in cluster.faults]
    r["unexplained_answers"] = ledger.unexplained
    r["panics"] = read_panics(cluster)
    r["processes_failed"] = [f"{name} exited with {rc} unasked" for name, rc in cluster.exited_unasked()]
    r["processes_failed"] += cluster.failures
    r["store_losses"] = len(cluster.store_losses)
    return r


def print_report(args, r):
    out = []
    w = out.append
    kills = sum(1 for _, k, _ in r["faults"] if k == "SIGKILL worker")
    broker = sum(1 for _, k, _ in r["faults"] if k == "rabbitmqctl stop_app")
    gw = sum(1 for _, k, _ in r["faults"] if k == "SIGKILL gateway")
    t = r["timing"]
    w("")
    w(f"Soak under faults: namespace {r['namespace']}, {args.gateways} gateways, {args.workers} workers "
      f"(tiny GPT-J, --max-batch-size {args.max_batch_size}), {r['jobs']} jobs at {args.rate:g}/s, "
      f"{args.min_tokens}-{args.max_tokens} new tokens ({args.long_share:.0%} of them up to {args.long_tokens}), "
      f"/run timeout {args.run_timeout} s")
    if args.command:
        w(f"Command: {args.command}")
    if r.get("faults_summary"):
        w(f"Faults: {r['faults_summary']}")
    else:
        w(f"Faults: {kills} worker SIGKILLs (each restarted), {broker} RabbitMQ restart "
          f"(`{args.broker_stop_cmd}`, then `{args.broker_start_cmd}` {args.broker_down_s:g} s later), "
          f"{gw} gateway SIGKILL (restarted)")
    w(f"Submitted in {t['submitted_s']:.0f} s, drained after {t['drained_s']:.0f} s, {t['total_s']:.0f} s in all")
    w("Fault times (s): " + ", ".join(f"{at:g} {k.replace('rabbitmqctl ', '')}" for at, k, _ in r["faults"]))
    if r.get("lost_with_store_jobs"):
        w("")
        w(f"HTTP RESULTS GONE WITH REDIS' DATA: {json.dumps(r['lost_with_store_jobs'][:20])}")
    w("")
    rows = []
    acc = r["accepted"]
    rows.append(("jobs accepted", f"{sum(acc.values())} (HTTP /v1/jobs {acc['http']}, /run {acc['run']}, "
                                  f"AMQP {acc['amqp']})"))
    for key, n in r["finals"].items():
        c, k = key.split("|", 1)
        rows.append((f"  final: {k} [{c}]", str(n)))
    rows.append(("jobs lost (accepted, no final state)", f"{r['lost']}"))
    if r.get("store_losses"):
        rows.append(("  HTTP results gone with Redis' data (documented; answered 404)", str(r["lost_with_store"])))
        rows.append(("  job records a worker's reply made again after it", str(r["records_recreated"])))
    rows.append(("jobs answered twice to a client", f"{r['answered_twice']}"))
    rows.append(("  AMQP: a 2nd, identical final reply, the documented case", f"{r['answered_twice_documented']}"))
    rows.append(("jobs run twice by workers", f"{r['run_twice']} of {r['jobs_run']} run"))
    for reason, n in sorted(r["run_twice_reasons"].items()):
        rows.append((f"  earlier run: {reason}", str(n)))
    rows.append(("  redeliveries answered from a worker's memory", str(r["answered_from_memory"])))
    rows.append(("  jobs a gateway republished (publish unconfirmed)", str(r["republished_by_a_gateway"])))
    rows.append(("  job starts that were redeliveries", str(r["redelivered_starts"])))
    rows.append(("  job records by attempts", ", ".join(f"{k}: {v}" for k, v in r["record_attempts"].items())))
    rc = r["run_calls"]
    rows.append(("/run calls", str(rc["calls"])))
    for k, v in rc.items():
        if k != "calls":
            rows.append((f"  {k}", str(v)))
    refusals = r["refusals"]
    rows.append(("submissions refused (not accepted)", str(sum(refusals.values()))))
    for k, v in refusals.items():
        rows.append((f"  {k}", str(v)))
    cut = r["cut_off"]
    rows.append(("submissions cut off by a fault (no answer), or outcome_unknown", str(sum(cut.values()))))
    for k, v in sorted(cut.items()):
        rows.append((f"  {k}", str(v)))
    rows.append(("job records whose attempts exceed their runs", str(len(r["records_attempts_over_runs"]))))
    # What the soak cannot explain: each must be 0.
    unexplained = collections.Counter(f"{a['call']} {a['status']}" for a in r["unexplained_answers"])
    rows.append(("HTTP answers no documented case explains", str(len(r["unexplained_answers"]))))
    for k, v in sorted(unexplained.items()):
        rows.append((f"  {k}", str(v)))
    rows.append(("job records the soak did not submit (foreign)", str(len(r["foreign_records"]))))
    rows.append(("job records of submissions not accepted (ghosts)", str(len(r["ghost_records"]))))
    rows.append(("HTTP jobs accepted without a record here", str(len(r["accepted_without_record"]))))
    rows.append(("AMQP replies to ids not published or not accepted", str(len(r["stray_replies"]))))
    rows.append(("jobs whose result differs between views", str(len(r["texts_differ"]))))
    rows.append(("panics in the processes' logs", str(len(r["panics"]))))
    rows.append(("gateways or workers that exited unasked or did not restart", str(len(r["processes_failed"]))))
    width = max(len(a) for a, _ in rows)
    w(f"{'what'.ljust(width)}  count")
    w(f"{'-' * width}  {'-' * 5}")
    for a, b in rows:
        w(f"{a.ljust(width)}  {b}")
    w("")
    if r["lost"]:
        w(f"LOST: {json.dumps(r['lost_jobs'][:20])}")
    if r["answered_twice"]:
        w(f"ANSWERED TWICE: {json.dumps(r['answered_twice_jobs'][:20])}")
    if r["run_twice_unexplained"]:
        w("RUN TWICE, UNEXPLAINED: " + json.dumps([j for j in r["run_twice_jobs"]
                                                   if any(x.startswith("unexplained") for x in j["reasons"])][:20]))
    if r["cut_off_not_ended"]:
        w(f"CUT OFF AND NOT ENDED: {json.dumps(r['cut_off_not_ended'][:20])}")
    if r["records_attempts_over_runs"]:
        w(f"ATTEMPTS OVER RUNS: {json.dumps(r['records_attempts_over_runs'][:20])}")
    for key, title in UNEXPLAINED.items():
        if r[key]:
            w(f"{title}: {json.dumps(r[key][:20])}")
    if r["answered_twice_documented"]:
        w("AMQP, ANSWERED AGAIN AFTER THE WORKER DIED BETWEEN ITS REPLY AND ITS ACK (at least once, docs/amqp.md): "
          + json.dumps(r["answered_twice_documented_jobs"][:20]))
    w(f"{'FAIL' if failed(args, r) else 'PASS'}: {r['lost']} lost, {r['answered_twice']} answered twice, "
      f"{r['run_twice_unexplained']} run again without a documented cause, "
      f"{sum(len(r[key]) for key in UNEXPLAINED)} unexplained (answers, records, replies, texts, panics, exits)"
      f"{' (STRICT: the documented second replies count too)' if args.strict else ''}; logs in {args.log_dir}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Interrupted as e:
        log(f"interrupted by {e}: every process the soak started is stopped")
        sys.exit(128 + e.signum)
