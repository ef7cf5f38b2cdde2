#!/usr/bin/env python3
"""Proves that scripts/check-deploy.sh fails on invalid deployment files, one kind of mistake at a time.

Each case copies the deployment files into a scratch directory, breaks one thing, runs the whole check there
and expects it to fail with a message that names the mistake. The unchanged copy must pass, so a case fails
for its own mistake only. A case whose text to break is no longer in the file fails too (the case is stale).

Run by scripts/check-deploy.sh (skipped with CHECK_DEPLOY_SELFTEST=0), with DEPLOY_TOOLS set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The Rust sources are copied for the metric names the monitoring files must use (check_deploy.py reads them).
COPIED = ["compose", "img", "scripts/check-deploy.sh", "scripts/lib.sh", "scripts/images.sh",
          "scripts/compose-e2e.sh", "scripts/compose-faults.sh", "gateway/src", "worker/src"]

# (what the case breaks, file, text in it, replacement, text the failure must contain)
CASES = [
    (
        "an old-engine override that misses a start_interval",
        "compose/engine-before-25.yml",
        "  redis:\n    healthcheck:\n      start_interval: !reset null\n",
        "",
        "service redis: its healthcheck's start_interval must be reset",
    ),
    (
        "a compose key the specification does not have",
        "compose/docker-compose.yml",
        "    stop_grace_period: 35s\n",
        "    stop_grace_period: 35s\n    stop_grace: 30s\n",
        "stop_grace",
    ),
    (
        "a compose value of the wrong type",
        "compose/docker-compose.yml",
        "      start_period: 10s\n      start_interval: 1s\n      retries: 5",
        "      start_period: 10s\n      start_interval: 1s\n      retries: five",
        "retries",
    ),
    (
        "the GPU worker without its GPU reservation",
        "compose/docker-compose.yml",
        "            - driver: nvidia\n              count: ${WORKER_GPUS:-all}\n              capabilities: [gpu]",
        "            - driver: nvidia\n              count: ${WORKER_GPUS:-all}\n              capabilities: [compute]",
        "must reserve NVIDIA GPUs",
    ),
    (
        "the GPU worker left on the CPU (the worker's default placement)",
        "compose/docker-compose.yml",
        "      DEFAULT_DEVICE: cuda\n",
        "",
        "must place the model on the GPU",
    ),
    (
        "Redis published on the host",
        "compose/docker-compose.yml",
        '    command: ["redis-server", "--appendonly", "yes"]\n',
        '    command: ["redis-server", "--appendonly", "yes"]\n    ports:\n      - "6379:6379"\n',
        "must not publish a port",
    ),
    (
        "the broker published on every interface by default",
        "compose/docker-compose.yml",
        "${AMQP_PUBLISH:-127.0.0.1:5672}:5672",
        "${AMQP_PUBLISH:-5672}:5672",
        "must be published on 127.0.0.1",
    ),
    (
        "the gateway started before Redis is healthy",
        "compose/docker-compose.yml",
        "      redis:\n        condition: service_healthy\n    environment:",
        "      redis:\n        condition: service_started\n    environment:",
        "must start after redis is healthy",
    ),
    (
        "the worker image running as root",
        "compose/worker.Dockerfile",
        "USER 10001:10001\n",
        "",
        "non-root USER",
    ),
    (
        "a Dockerfile hadolint rejects",
        "compose/gateway.Dockerfile",
        "WORKDIR /src\n",
        "RUN cd /src\n",
        "DL3003",
    ),
    (
        "a Kubernetes field of the wrong type",
        "compose/k8s/gateway.yaml",
        "  replicas: 2\n",
        '  replicas: "2"\n',
        "spec.replicas",
    ),
    (
        "a misspelt Kubernetes kind (no schema would check it)",
        "compose/k8s/gateway.yaml",
        "kind: PodDisruptionBudget",
        "kind: PodDisruptionBudgett",
        "PodDisruptionBudgett",
    ),
    (
        "a secret key the worker reads but nobody defines",
        "compose/k8s/worker.yaml",
        "                  key: AMQP_URL",
        "                  key: AMQP_URI",
        "AMQP_URI, which is not defined",
    ),
    (
        "KEDA counting only ready jobs (busy workers scaled down)",
        "compose/k8s/keda.yaml",
        'queueName: gptj.jobs\n        vhostName: /\n        excludeUnacknowledged: "false"',
        'queueName: gptj.jobs\n        vhostName: /\n        excludeUnacknowledged: "true"',
        "must count unacknowledged",
    ),
    (
        "KEDA reading the queue over AMQP",
        "compose/k8s/keda.yaml",
        "        protocol: http\n        mode: QueueLength\n        # Jobs (waiting",
        "        protocol: amqp\n        mode: QueueLength\n        # Jobs (waiting",
        "protocol: http",
    ),
    (
        "KEDA watching a queue the workers do not consume",
        "compose/k8s/keda.yaml",
        "queueName: gptj.jobs\n",
        "queueName: gptj.job\n",
        "is not the jobs queue",
    ),
    (
        "KEDA scaling on the interactive lane only (a batch backlog would wait for ever at zero workers)",
        "compose/k8s/keda.yaml",
        "queueName: gptj.jobs.batch",
        "queueName: gptj.jobs",
        "no trigger for gptj.jobs.batch",
    ),
    (
        "KEDA trigger metadata that is not a string",
        "compose/k8s/keda.yaml",
        'value: "40"\n        # Wake from zero',
        'value: 40\n        # Wake from zero',
        "is not of type 'string'",
    ),
    (
        "an alert on a metric the Rust sources do not define",
        "compose/monitoring/alerts.yml",
        "expr: worker_num_requests_waiting > 0 and on (instance)",
        "expr: worker_num_requests_queued > 0 and on (instance)",
        "metric worker_num_requests_queued is not defined",
    ),
    (
        "a dashboard panel on a metric the Rust sources do not define",
        "compose/monitoring/grafana/dashboards/gptj.json",
        '"expr": "worker_kv_cache_positions_allocated{',
        '"expr": "worker_kv_cache_positions_reserved{',
        "metric worker_kv_cache_positions_reserved is not defined",
    ),
    (
        "an alert on a label the metric does not have",
        "compose/monitoring/alerts.yml",
        'gateway_jobs_total{outcome=~"publish_failed|unconfirmed"}',
        'gateway_jobs_total{result=~"publish_failed|unconfirmed"}',
        "gateway_jobs_total has no label 'result'",
    ),
    (
        "a histogram series of a metric that is no histogram",
        "compose/monitoring/alerts.yml",
        "sum by (instance) (rate(worker_generation_tokens_total[5m])) > 0",
        "sum by (instance) (rate(worker_generation_tokens_total_count[5m])) > 0",
        "worker_generation_tokens_total is not a histogram",
    ),
    (
        "an alert whose unit test no longer holds",
        "compose/monitoring/alerts.yml",
        "(rate(worker_time_to_first_token_seconds_bucket[5m]))) > 10",
        "(rate(worker_time_to_first_token_seconds_bucket[5m]))) > 30",
        "alertname: TimeToFirstTokenHigh",
    ),
    (
        "an alert rule that does not parse",
        "compose/monitoring/alerts.yml",
        "expr: max(gateway_queue_consumers) == 0 and max(gateway_queue_depth) > 0",
        "expr: max(gateway_queue_consumers) == 0 and max(gateway_queue_depth > 0",
        "parse error",
    ),
    (
        "a dashboard query that does not parse",
        "compose/monitoring/grafana/dashboards/gptj.json",
        "sum by (finish_reason) (rate(worker_jobs_finished_total",
        "sum by (finish_reason) rate(worker_jobs_finished_total",
        "promtool rejects a query",
    ),
    (
        "the dashboard on a datasource Grafana does not provision",
        "compose/monitoring/grafana/provisioning/datasources/prometheus.yml",
        "    uid: gptj-prometheus\n",
        "    uid: prometheus\n",
        "is not the provisioned one",
    ),
    (
        "a worker service Prometheus does not scrape",
        "compose/monitoring/prometheus.yml",
        "names: [worker, worker-gpu1, worker-cpu]",
        "names: [worker, worker-gpu1]",
        "does not scrape the service worker-cpu",
    ),
    (
        "an image not pinned to a version",
        "compose/docker-compose.yml",
        "    image: grafana/grafana:11.6.0\n",
        "    image: grafana/grafana:latest\n",
        "must be pinned to a version",
    ),
    (
        "Grafana published on every interface by default",
        "compose/docker-compose.yml",
        "${GRAFANA_PUBLISH:-127.0.0.1:3000}:3000",
        "${GRAFANA_PUBLISH:-3000}:3000",
        "port 3000 must be published on 127.0.0.1",
    ),
    (
        "the monitoring services started without their profile",
        "compose/docker-compose.yml",
        "    image: prom/prometheus:v3.5.0\n    profiles: [monitoring]\n",
        "    image: prom/prometheus:v3.5.0\n",
        "expected rabbitmq, redis, gateway, worker",
    ),
    (
        "the alert rules mounted writable",
        "compose/docker-compose.yml",
        "./monitoring/alerts.yml:/etc/prometheus/alerts.yml:ro",
        "./monitoring/alerts.yml:/etc/prometheus/alerts.yml",
        "/etc/prometheus/alerts.yml must be mounted read-only",
    ),
]


def run_check(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CHECK_DEPLOY_SELFTEST="0")
    return subprocess.run(
        ["bash", str(tree / "scripts/check-deploy.sh")], capture_output=True, text=True, env=env, check=False
    )


def copy_tree(into: Path) -> None:
    for relative in COPIED:
        source, target = ROOT / relative, into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def main() -> int:
    if "DEPLOY_TOOLS" not in os.environ:
        print("selftest: DEPLOY_TOOLS must name the tools virtualenv", file=sys.stderr)
        return 2
    failures = []
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as scratch:
        pristine = Path(scratch) / "pristine"
        copy_tree(pristine)
        result = run_check(pristine)
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            print("selftest: the unchanged files do not pass", file=sys.stderr)
            return 1
        for index, (what, relative, old, new, expected) in enumerate(CASES):
            tree = Path(scratch) / f"case-{index}"
            copy_tree(tree)
            path = tree / relative
            text = path.read_text()
            if text.count(old) != 1:
                failures.append(f"{what}: the text to break is not (once) in {relative}; update the case")
                continue
            path.write_text(text.replace(old, new))
            result = run_check(tree)
            output = result.stdout + result.stderr
            if result.returncode == 0:
                failures.append(f"{what}: the check passed")
            elif expected not in output:
                failures.append(f"{what}: the check failed without naming it ({expected!r}):\n{output}")
            else:
                print(f"ok: rejects {what}")
            shutil.rmtree(tree)
    for failure in failures:
        print(f"FAIL selftest: {failure}", file=sys.stderr)
    print(f"selftest: {len(CASES) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
