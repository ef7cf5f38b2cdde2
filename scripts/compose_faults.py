"""The fault test across containers behind scripts/compose-faults.sh (run that, not this).

The soak's clients and checker (scripts/soak.py: HTTP `POST /v1/jobs` + polls, `POST /run`, AMQP publishes
with a durable reply queue; then 0 lost, 0 answered twice, every second run explained) driven against the
compose deployment, `compose/docker-compose.yml` + `compose/faults.yml`, `cpu` profile: 2 gateways, 3 CPU
workers, Redis, and RabbitMQ as a three-node cluster, all containers. Meanwhile it breaks the deployment as
an operator's machines break, one fault at a time at planned points of the load (worker kills all along):

- a worker container killed (`docker kill`, SIGKILL) mid-batch and started again, every KILL_EVERY s;
- a worker paused (`docker pause`: a frozen process) for PAUSE_S, longer than its AMQP heartbeats allow;
- the RabbitMQ node that leads the jobs queue stopped (`docker compose stop`) for BROKER_DOWN_S;
- a worker cut from the brokers (`docker network disconnect` of the compose network) for CUT_S;
- a gateway cut from Redis (`docker network disconnect` of the `store` network) for CUT_S;
- Redis restarted empty (its container and volume removed, a new one started).

A worker's id in a container is HOSTNAME-s<start>, one per start of the container, so the checker tells a
run cut off by a fault from a run repeated for no reason, as the process soak does with its incarnations.
What a fault explains: a run in flight on a worker that was killed, paused or cut, or while the broker node
stopped; a 404 for an HTTP job accepted before Redis came back empty (its record is gone; docs/deployment.md
says what that loses), counted apart from the lost jobs.
"""

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak  # noqa: E402 - the soak's clients and checker, imported from beside this file

log = soak.log


class Stack:
    """The compose project: its commands, containers and networks."""

    def __init__(self, args):
        self.args = args
        self.files = ["-f", "compose/docker-compose.yml", "-f", "compose/faults.yml"]
        for extra in args.extra_file:
            self.files += ["-f", extra]

    def compose(self, *cmd, check=True, capture=False, timeout=600):
        full = ["docker", "compose", *self.files, "-p", self.args.project, "--profile", "cpu", *cmd]
        r = subprocess.run(full, check=False, text=True, timeout=timeout,
                           stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-500:]}")
        return r.stdout if capture else r.returncode

    def containers(self, service):
        """The service's containers by replica number (1, 2, …): [(number, id)]."""
        out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.args.project}",
                              "--filter", f"label=com.docker.compose.service={service}", "--format",
                              '{{.ID}} {{.Label "com.docker.compose.container-number"}}'],
                             check=True, text=True, capture_output=True).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return sorted((int(n), cid) for cid, n in rows)

    def network(self, name):
        return f"{self.args.project}_{name}"


def docker(*cmd, timeout=120, check=True):
    r = subprocess.run(["docker", *cmd], check=False, text=True, capture_output=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(cmd)}: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def inspect(cid, fmt):
    return docker("inspect", "-f", fmt, cid, check=False)


def container_log(cid):
    """A container's log, every start of it, stdout and stderr together, as lines."""
    out = subprocess.run(["docker", "logs", cid], check=False, text=True, capture_output=True)
    return (out.stdout + out.stderr).splitlines()


def consuming_as(line):
    """The worker id a worker's `consuming jobs` log line names (it starts each process's service), else None."""
    if '"consuming jobs"' not in line:
        return None
    try:
        return json.loads(line)["fields"]["worker_id"]
    except (ValueError, KeyError):
        return None


class ComposeCluster(soak.FaultLog):
    """What soak.py's clients and checker ask of a cluster, for containers: gateway ports, fault records
    (kills, windows of lasting faults per worker id, broker windows, Redis losses), logs, unasked exits."""

    def __init__(self, args, stack):
        super().__init__()
        self.args = args
        self.stack = stack
        self.failures = []
        self.busy = set()  # worker containers under a lasting fault: not killed meanwhile
        self.ports = []
        self.gateway_ids = []
        self.closed = False

    def discover(self):
        self.gateway_ids = [cid for _, cid in self.stack.containers("gateway")]
        self.ports = []
        for cid in self.gateway_ids:
            published = docker("port", cid, "8000/tcp").splitlines()[0]
            self.ports.append(int(published.rsplit(":", 1)[1]))

    def port(self, i):
        return self.ports[i]

    def workers(self):
        return [cid for _, cid in self.stack.containers("worker-cpu")]

    def worker_id(self, cid):
        """The id the container's current worker process consumes under (its last `consuming jobs` line)."""
        ids = [w for w in map(consuming_as, container_log(cid)) if w is not None]
        return ids[-1] if ids else None

    def consuming(self, cid):
        return inspect(cid, "{{.State.Status}}") == "running" and self.worker_id(cid) is not None

    def process_failed(self, what):
        with self.lock:
            self.failures.append(what)
        log(f"FAILED: {what}")

    def exited_unasked(self):
        """Containers the restart policy restarted (they exited though nothing stopped them), or not running."""
        out = []
        for service in ("gateway", "worker-cpu"):
            for n, cid in self.stack.containers(service):
                state = inspect(cid, "{{.State.Status}} {{.RestartCount}}").split()
                if len(state) == 2 and (state[0] != "running" or state[1] != "0"):
                    out.append((f"{service}-{n}", f"{state[0]}, restarted {state[1]} times by its policy"))
        return out

    def collect_logs(self):
        """Each gateway's log to a file; each worker container's log split by process (worker id)."""
        os.makedirs(self.args.log_dir, exist_ok=True)
        for n, cid in self.stack.containers("gateway"):
            path = os.path.join(self.args.log_dir, f"gateway-{n}.log")
            with open(path, "w") as out:
                subprocess.run(["docker", "logs", cid], stdout=out, stderr=subprocess.STDOUT, check=False)
            self.gateway_logs.append(path)
        for n, cid in self.stack.containers("worker-cpu"):
            # Lines up to a process's first `consuming jobs` are its start-up: they go with it.
            by_worker = collections.defaultdict(list)
            pending = []
            current = None
            for line in container_log(cid):
                worker = consuming_as(line)
                if worker is not None and worker != current:
                    current = worker
                    by_worker[current] += pending
                    pending = []
                if current is None or "init-tiny-model" in line:
                    pending.append(line)
                else:
                    by_worker[current].append(line)
            for worker, wl in by_worker.items():
                path = os.path.join(self.args.log_dir, f"worker-{n}-{worker}.log")
                with open(path, "w") as out:
                    out.write("\n".join(wl) + "\n")
                self.worker_logs.append((worker, path))

    def stop_all(self):
        self.closed = True

    def broker_start(self):
        pass  # the fault thread starts the node it stopped; compose-faults.sh removes the stack in any case


# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------


def kill_worker(cluster, cid):
    worker = cluster.worker_id(cid)
    docker("kill", cid)
    t = cluster.fault("docker kill worker", worker)
    with cluster.lock:
        cluster.killed[worker] = t
    time.sleep(cluster.args.restart_delay_s)
    docker("start", cid)


def lasting(cluster, how, target, begin, end, seconds):
    """`begin()`, `seconds`, `end()`, each end logged as a fault of `target`: (when it began, when it ended)."""
    t0 = time.time()
    begin()
    cluster.fault(how, target)
    time.sleep(seconds)
    end()
    return t0, cluster.fault(f"ended: {how}", target)


def lasting_worker_fault(cluster, cid, how, begin, end, seconds):
    """A fault that lasts `seconds` on worker container `cid`: its run in flight meanwhile is cut off."""
    worker = cluster.worker_id(cid)
    with cluster.lock:
        cluster.busy.add(cid)
    try:
        t0, t1 = lasting(cluster, how, worker, begin, end, seconds)
        with cluster.lock:
            cluster.windows[worker].append((t0, t1 + 1, how))
    finally:
        with cluster.lock:
            cluster.busy.discard(cid)


def pause_worker(cluster, cid):
    lasting_worker_fault(cluster, cid, "docker pause worker", lambda: docker("pause", cid),
                         lambda: docker("unpause", cid), cluster.args.pause_s)


def cut_worker(cluster, cid):
    net = cluster.stack.network("default")
    lasting_worker_fault(cluster, cid, "worker cut from the brokers", lambda: docker("network", "disconnect", net, cid),
                         lambda: docker("network", "connect", net, cid), cluster.args.cut_s)


def cut_gateway(cluster, i):
    cid = cluster.gateway_ids[i]
    net = cluster.stack.network("store")
    lasting(cluster, "gateway cut from Redis", f"gateway-{i + 1}", lambda: docker("network", "disconnect", net, cid),
            lambda: docker("network", "connect", net, cid), cluster.args.cut_s)


NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")


def jobs_queue(stack, args, column):
    """`column` of `rabbitmqctl list_queues` for the jobs queue, asked of each node in turn until one
    answers (one may be the node stopped): its text, or None."""
    for _, cid in [c for svc in NODES for c in stack.containers(svc)]:
        out = docker("exec", cid, "rabbitmqctl", "-q", "list_queues", "name", column, check=False, timeout=60)
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == f"{args.namespace}.jobs":
                return fields[1]
    return None


def jobs_queue_leader(cluster):
    """The service of the node that leads the jobs queue (`rabbit@rabbitmq-2` → `rabbitmq-2`), or None."""
    leader = jobs_queue(cluster.stack, cluster.args, "leader")
    return leader.split("@", 1)[1] if leader else None


def stop_leader(cluster):
    leader = jobs_queue_leader(cluster)
    if leader is None:
        cluster.process_failed("no node answered which one leads the jobs queue")
        return
    t0 = cluster.fault("docker compose stop, the jobs queue's leader", leader)
    cluster.stack.compose("stop", "-t", "30", leader)
    time.sleep(cluster.args.broker_down_s)
    cluster.stack.compose("start", leader)
    t1 = cluster.fault("started again", leader)
    with cluster.lock:
        cluster.broker_windows.append((t0, t1))
    await_healthy(cluster, leader)


def await_healthy(cluster, service, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [inspect(cid, "{{.State.Health.Status}}") for _, cid in cluster.stack.containers(service)]
        if states and all(s == "healthy" for s in states):
            return
        time.sleep(1)
    cluster.process_failed(f"{service} not healthy {timeout} s after the fault")


def empty_redis(cluster):
    t0 = cluster.fault("Redis removed with its volume", "redis")
    # Known from its start: a poll answered 404 meanwhile is explained by it.
    loss = [t0, None]
    with cluster.lock:
        cluster.store_losses.append(loss)
    try:
        cluster.stack.compose("rm", "-sf", "redis")
        docker("volume", "rm", f"{cluster.args.project}_redis-data")
        cluster.stack.compose("up", "-d", "--no-deps", "redis")
        await_healthy(cluster, "redis")
    finally:
        loss[1] = cluster.fault("an empty Redis up", "redis")


def run_faults(args, cluster, load_s, stop):
    rng = random.Random(args.seed + 2)
    t0 = time.monotonic()
    plan = [(args.pause_at * load_s, "pause"), (args.leader_at * load_s, "leader"),
            (args.cut_worker_at * load_s, "cut worker"), (args.cut_gateway_at * load_s, "cut gateway"),
            (args.redis_at * load_s, "redis")]
    t = rng.uniform(0.5, 1.0) * args.kill_every
    while t < load_s:
        plan.append((t, "kill"))
        t += rng.uniform(0.5, 1.5) * args.kill_every
    plan.sort()
    threads = []
    for at, kind in plan:
        while not stop.is_set() and time.monotonic() - t0 < at:
            time.sleep(0.05)
        if stop.is_set():
            break
        if kind == "cut gateway":
            target, fn = 1, cut_gateway
        elif kind == "redis":
            target, fn = None, empty_redis
        elif kind == "leader":
            target, fn = None, stop_leader
        else:
            with cluster.lock:
                free = [cid for cid in cluster.workers() if cid not in cluster.busy]
            free = [cid for cid in free if cluster.consuming(cid)]
            if not free:
                continue
            target = rng.choice(free)
            fn = {"kill": kill_worker, "pause": pause_worker, "cut worker": cut_worker}[kind]
        # Each fault in a thread of its own: the kills go on while a lasting fault lasts.
        args_ = (cluster,) if target is None else (cluster, target)
        th = threading.Thread(target=guarded, args=(cluster, kind, fn, args_), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()


def guarded(cluster, kind, fn, fn_args):
    try:
        fn(*fn_args)
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        cluster.process_failed(f"fault {kind}: {e}")


def await_consumers(stack, args, n, timeout=240):
    """Until the jobs queue has `n` consumers, as a running node counts them."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = jobs_queue(stack, args, "consumers")
        if seen == str(n):
            return
        time.sleep(1)
    raise SystemExit(f"the jobs queue has {seen} consumers, not {n}, after {timeout} s")


def queued(stack, args):
    """Jobs the broker holds, ready or delivered and not yet acknowledged (None when no node answers)."""
    messages = jobs_queue(stack, args, "messages")
    return int(messages) if messages is not None else None


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--project", required=True)
    p.add_argument("--extra-file", action="append", default=[], help="more compose files (-f ...)")
    p.add_argument("--namespace", default="gptj")
    p.add_argument("--amqp-url", required=True, help="the three nodes' URLs, comma-separated, from the host")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--long-share", type=float, default=0.1)
    p.add_argument("--long-tokens", type=int, default=160)
    p.add_argument("--http-share", type=float, default=0.4)
    p.add_argument("--run-share", type=float, default=0.2)
    p.add_argument("--amqp-share", type=float, default=0.4)
    p.add_argument("--cancel-share", type=float, default=0.03)
    p.add_argument("--run-timeout", type=int, default=2)
    p.add_argument("--poll-s", type=float, default=0.5)
    p.add_argument("--kill-every", type=float, default=12.0)
    p.add_argument("--restart-delay-s", type=float, default=0.5)
    p.add_argument("--pause-s", type=float, default=35.0)
    p.add_argument("--cut-s", type=float, default=20.0)
    p.add_argument("--broker-down-s", type=float, default=15.0)
    p.add_argument("--pause-at", type=float, default=0.08)
    p.add_argument("--leader-at", type=float, default=0.36)
    p.add_argument("--cut-worker-at", type=float, default=0.5)
    p.add_argument("--cut-gateway-at", type=float, default=0.72)
    p.add_argument("--redis-at", type=float, default=0.86)
    p.add_argument("--drain-timeout", type=float, default=240.0)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", type=int, default=0)
    p.add_argument("--http-threads", type=int, default=16)
    p.add_argument("--command")
    p.add_argument("--json")
    args = p.parse_args()
    # What soak.check and soak.print_report read of a process soak's arguments.
    args.broker_stop_cmd = args.broker_start_cmd = ""

    stack = Stack(args)
    cluster = ComposeCluster(args, stack)
    cluster.discover()
    if len(cluster.ports) != args.gateways:
        raise SystemExit(f"{len(cluster.ports)} gateway containers, not {args.gateways}")
    await_consumers(stack, args, args.workers)
    log(f"project {args.project}: gateways on ports {cluster.ports}, {args.workers} workers consuming; "
        f"the jobs queue's leader: {jobs_queue_leader(cluster)}")

    ledger = soak.Ledger()
    started = time.time()

    def drained(open_jobs):
        # A job whose record went with Redis' data answers 404 until a worker starts it, if it was still
        # queued; once the broker holds no job, a 404 left is a result gone for good.
        return not open_jobs or (all(j.record_gone for j in open_jobs) and queued(stack, args) == 0)

    outcome = soak.load_and_drain(args, cluster, ledger, run_faults,
                                  lambda: await_consumers(stack, args, args.workers), drained)
    cluster.collect_logs()
    kinds = collections.Counter(k for _, k, _ in cluster.faults if not k.startswith(("ended", "started", "an empty")))
    return soak.verdict(args, cluster, ledger, outcome, started,
                        faults_summary=", ".join(f"{n}× {k}" for k, n in kinds.items()))


if __name__ == "__main__":
    sys.exit(main())
