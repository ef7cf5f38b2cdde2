#!/usr/bin/env python3
"""Checks the deployment files where there is no container engine and no cluster.

Run by scripts/check-deploy.sh, which installs what this needs (PyYAML, jsonschema, the docker compose binary)
and runs the other tools (kubernetes-validate, hadolint, shellcheck). This file checks:

- the compose files against the Compose Specification's JSON schema, and the model `docker compose config`
  resolves from them (default and `cpu` profile) against the rules the deployment promises: healthchecks,
  restart policies, start order on healthy RabbitMQ and Redis, GPU reservation, no published Redis port, the
  broker published on loopback only, non-root images;
- the Kubernetes manifests for what schemas cannot see: references between objects (selectors, ConfigMap and
  Secret keys, the PVC, KEDA's target and authentication), the GPU request, and that KEDA counts the jobs
  workers hold (ready + unacknowledged) on the queue the workers consume;
- the KEDA objects against compose/schema/keda-v1alpha1.json;
- that every diagram source in img/ has its rendered SVG and PNG beside it;
- the monitoring files (compose/monitoring/): the `monitoring` profile's Prometheus and Grafana services and
  their mounts, that Prometheus scrapes every gateway and worker service of the compose files on their
  ports, that the alert rules carry severity, summary and description, that the dashboard uses the
  provisioned datasource, and that every metric the alerts and the dashboard query is one the Rust sources
  define (gateway/src/metrics.rs, worker/src/service/metrics.rs), with labels they set; with --promtool,
  that every dashboard query parses (promtool itself checks the rules and runs their unit tests).

Every image not built here must be pinned to a version (no `latest`, no bare name).

Every failure is printed; the exit status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
SCHEMA_DIR = COMPOSE_DIR / "schema"
COMPOSE_FILES = ["docker-compose.yml", "one-worker-per-gpu.yml"]
# The override for engines older than 25: checked against the schema, and for resetting every start_interval.
OLD_ENGINE_FILE = "engine-before-25.yml"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
MONITORING_DIR = COMPOSE_DIR / "monitoring"
# The crates whose metrics the monitoring files watch, each with the prefix of its metric names. The names are
# the `pub const X: &str = "gateway_..."` lines of the crate's sources (gateway/src/telemetry.rs and
# worker/src/service/metrics.rs today; found wherever they are).
METRIC_CRATES = {ROOT / "gateway/src": "gateway_", ROOT / "worker/src": "worker_"}
METRIC_FILES: set[str] = set()  # where rust_metrics() found them, for messages

failures: list[str] = []


def fail(where: str, message: str) -> None:
    failures.append(f"{where}: {message}")


def check(condition: bool, where: str, message: str) -> bool:
    if not condition:
        fail(where, message)
    return condition


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that accepts Compose's merge-control tags (`!reset`, `!override`) as plain values."""


def _tagged(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_multi_constructor("!", _tagged)


def schema_errors(schema: dict, document, where: str) -> None:
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in error.absolute_path) or "(root)"
        fail(where, f"schema: at {path}: {error.message}")


# ---------------------------------------------------------------------------------------------------- compose


def compose_config(compose: str, files: list[str], profile: str | list[str] | None) -> dict | None:
    """The model `docker compose config` resolves, with defaults only (no variable of the caller's shell)."""
    profiles = [profile] if isinstance(profile, str) else list(profile or [])
    command = [compose]
    for name in files:
        command += ["-f", str(COMPOSE_DIR / name)]
    for name in profiles:
        command += ["--profile", name]
    command += ["config", "--format", "json"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    label = " + ".join(files) + "".join(f" --profile {p}" for p in profiles)
    # An exit status of 0 is not enough: a wrapper may lose the binary's status, and then stdout is empty.
    try:
        model = json.loads(result.stdout) if result.returncode == 0 else None
    except json.JSONDecodeError:
        model = None
    if not isinstance(model, dict):
        fail(label, f"docker compose config failed: {result.stderr.strip()}")
        return None
    return model


def dockerfile_final_user(path: Path) -> str | None:
    """The last USER of the last stage, or None when the final stage sets none (it then runs as root)."""
    user = None
    for line in path.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0].upper() == "FROM":
            user = None
        elif words[0].upper() == "USER" and len(words) > 1:
            user = words[1]
    return user


def check_old_engine_override(schema: dict) -> None:
    """engine-before-25.yml must reset start_interval in every service whose healthcheck sets it."""
    path = COMPOSE_DIR / OLD_ENGINE_FILE
    where = str(path.relative_to(ROOT))
    if not check(path.is_file(), where, "missing"):
        return
    document = yaml.load(path.read_text(), Loader=ComposeLoader)
    schema_errors(schema, document, where)
    main = yaml.load((COMPOSE_DIR / "docker-compose.yml").read_text(), Loader=ComposeLoader)
    overridden = (document or {}).get("services") or {}
    for name, service in ((main or {}).get("services") or {}).items():
        if "start_interval" in ((service or {}).get("healthcheck") or {}):
            reset = "start_interval" in (((overridden.get(name) or {}).get("healthcheck")) or {})
            check(reset, where, f"service {name}: its healthcheck's start_interval must be reset (!reset null)")


def check_compose_source(schema: dict) -> None:
    for name in COMPOSE_FILES:
        path = COMPOSE_DIR / name
        if not check(path.is_file(), str(path.relative_to(ROOT)), "missing"):
            continue
        document = yaml.load(path.read_text(), Loader=ComposeLoader)
        schema_errors(schema, document, str(path.relative_to(ROOT)))
    check_old_engine_override(schema)
    env_file = COMPOSE_DIR / ".env"
    check(
        env_file.is_file() and re.search(r"^COMPOSE_PROFILES=gpu$", env_file.read_text(), re.M) is not None,
        "compose/.env",
        "must set COMPOSE_PROFILES=gpu, so that a plain `docker compose up` starts the GPU worker",
    )


def check_service_common(where: str, service: dict) -> None:
    check(service.get("restart") in ("unless-stopped", "always"), where, "needs restart: unless-stopped")
    check(service.get("logging", {}).get("options", {}).get("max-size") is not None, where, "logs must rotate")
    check_pinned_image(where, service)


def check_pinned_image(where: str, service: dict) -> None:
    """An image pulled from a registry must name a version: `latest` or no tag changes under the deployment."""
    if "build" in service:
        return
    image = str(service.get("image", ""))
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    check(
        bool(name) and tag not in ("", "latest") and re.search(r"\d", tag) is not None,
        where,
        f"image {image!r} must be pinned to a version (name:version, not latest)",
    )


def check_built_image(where: str, service: dict) -> None:
    build = service.get("build")
    if not check(isinstance(build, dict), where, "must be built from a Dockerfile of compose/"):
        return
    check(Path(build.get("context", "")) == ROOT, where, "build context must be the repository root")
    dockerfile = ROOT / build.get("dockerfile", "")
    if check(dockerfile.is_file(), where, f"Dockerfile {dockerfile} missing"):
        user = dockerfile_final_user(dockerfile)
        check(
            user is not None and user.split(":")[0] not in ("root", "0"),
            str(dockerfile.relative_to(ROOT)),
            "the final stage must switch to a non-root USER",
        )


def amqp_host(environment: dict) -> str | None:
    url = environment.get("AMQP_URL") or ""
    return urlparse(url).hostname


def check_default_model(model: dict) -> None:
    where = "compose (default profile)"
    services = model.get("services", {})
    check(
        set(services) == {"rabbitmq", "redis", "gateway", "worker"},
        where,
        f"services are {sorted(services)}, expected rabbitmq, redis, gateway, worker",
    )
    for name, service in services.items():
        check_service_common(f"{where}: {name}", service)

    rabbitmq = services.get("rabbitmq", {})
    check("healthcheck" in rabbitmq, f"{where}: rabbitmq", "needs a healthcheck")
    published = {p.get("target"): p for p in rabbitmq.get("ports", [])}
    check(set(published) == {5672, 15672}, f"{where}: rabbitmq", "publishes AMQP 5672 and management 15672 only")
    for target, port in published.items():
        check(
            port.get("host_ip") == "127.0.0.1",
            f"{where}: rabbitmq",
            f"port {target} must be published on 127.0.0.1 by default, not {port.get('host_ip') or 'all interfaces'}",
        )

    redis = services.get("redis", {})
    check("healthcheck" in redis, f"{where}: redis", "needs a healthcheck")
    check(not redis.get("ports"), f"{where}: redis", "must not publish a port (only the gateways use Redis)")

    gateway = services.get("gateway", {})
    check("healthcheck" in gateway, f"{where}: gateway", "needs a healthcheck")
    check_built_image(f"{where}: gateway", gateway)
    depends = gateway.get("depends_on", {})
    for dependency in ("rabbitmq", "redis"):
        check(
            depends.get(dependency, {}).get("condition") == "service_healthy",
            f"{where}: gateway",
            f"must start after {dependency} is healthy",
        )
    environment = gateway.get("environment", {})
    check(amqp_host(environment) == "rabbitmq", f"{where}: gateway", "AMQP_URL must point at the rabbitmq service")
    check(
        urlparse(environment.get("REDIS_URL") or "").hostname == "redis",
        f"{where}: gateway",
        "REDIS_URL must point at the redis service",
    )
    check(
        [p.get("target") for p in gateway.get("ports", [])] == [8000],
        f"{where}: gateway",
        "publishes port 8000",
    )

    worker = services.get("worker", {})
    check_worker(f"{where}: worker", worker)
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    check(
        any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices),
        f"{where}: worker",
        "must reserve NVIDIA GPUs (deploy.resources.reservations.devices)",
    )
    check(
        any(v.get("target") == "/models" and v.get("read_only") for v in worker.get("volumes", [])),
        f"{where}: worker",
        "must mount the model directory read-only at /models",
    )
    check(
        str(worker.get("environment", {}).get("MODEL_DIR", "")).startswith("/models"),
        f"{where}: worker",
        "MODEL_DIR must be under /models",
    )
    # Say the GPU explicitly: the worker's own fallback (cuda:0 if visible, else the CPU) would hide a
    # container that lost its GPU behind a silent, slow CPU run.
    placement = worker.get("environment", {})
    check(
        str(placement.get("DEFAULT_DEVICE") or placement.get("DEVICE") or "").startswith("cuda"),
        f"{where}: worker",
        "must place the model on the GPU by default (DEFAULT_DEVICE=cuda)",
    )


def check_worker(where: str, worker: dict) -> None:
    check_built_image(where, worker)
    check(
        worker.get("depends_on", {}).get("rabbitmq", {}).get("condition") == "service_healthy",
        where,
        "must start after rabbitmq is healthy",
    )
    environment = worker.get("environment", {})
    check(amqp_host(environment) == "rabbitmq", where, "AMQP_URL must point at the rabbitmq service")
    for key in ("NAMESPACE", "MODEL_DIR", "MAX_BATCH_SIZE"):
        check(environment.get(key) not in (None, ""), where, f"must set {key}")
    check(worker.get("stop_grace_period") is not None, where, "needs a stop_grace_period to finish the jobs in its batch")


def check_cpu_model(model: dict) -> None:
    where = "compose (--profile cpu)"
    services = model.get("services", {})
    check(
        set(services) == {"rabbitmq", "redis", "gateway", "worker-cpu"},
        where,
        f"services are {sorted(services)}, expected the GPU worker replaced by worker-cpu",
    )
    worker = services.get("worker-cpu", {})
    check_service_common(f"{where}: worker-cpu", worker)
    check_worker(f"{where}: worker-cpu", worker)
    check(
        not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"),
        f"{where}: worker-cpu",
        "must not reserve a GPU",
    )
    entrypoint = " ".join(worker.get("entrypoint") or [])
    check("init-tiny-model" in entrypoint, f"{where}: worker-cpu", "must make the tiny model before serving")


def check_per_gpu_model(model: dict) -> None:
    where = "compose (+ one-worker-per-gpu.yml)"
    ids = []
    for name, service in model.get("services", {}).items():
        for device in service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            check("count" not in device or "device_ids" not in device, f"{where}: {name}", "count and device_ids")
            ids += device.get("device_ids", [])
    check(len(ids) >= 2 and len(ids) == len(set(ids)), where, f"each worker must reserve its own GPU, got {ids}")


def bind_mounts(service: dict) -> dict[str, dict]:
    return {v.get("target"): v for v in service.get("volumes", []) if v.get("type") == "bind"}


def check_mounted(where: str, service: dict, target: str, source: Path) -> None:
    mount = bind_mounts(service).get(target)
    if check(mount is not None, where, f"must mount {source.relative_to(ROOT)} at {target}"):
        relative = source.relative_to(ROOT)
        check(Path(mount.get("source", "")) == source, where, f"{target} must come from {relative}")
        check(bool(mount.get("read_only")), where, f"{target} must be mounted read-only")
        check(source.exists(), where, f"{source.relative_to(ROOT)} missing")


def check_monitoring_model(model: dict) -> None:
    where = "compose (--profile monitoring)"
    services = model.get("services", {})
    check(
        set(services) == {"rabbitmq", "redis", "gateway", "prometheus", "grafana"},
        where,
        f"services are {sorted(services)}, expected rabbitmq, redis, gateway, prometheus, grafana",
    )
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        service = services.get(name, {})
        check_service_common(f"{where}: {name}", service)
        check("healthcheck" in service, f"{where}: {name}", "needs a healthcheck")
        published = service.get("ports", [])
        check([p.get("target") for p in published] == [port], f"{where}: {name}", f"publishes port {port}")
        for entry in published:
            host = entry.get("host_ip") or "all interfaces"
            check(
                entry.get("host_ip") == "127.0.0.1",
                f"{where}: {name}",
                f"port {port} must be published on 127.0.0.1 by default, not {host}",
            )

    prometheus = services.get("prometheus", {})
    check(
        "--config.file=/etc/prometheus/prometheus.yml" in (prometheus.get("command") or []),
        f"{where}: prometheus",
        "must run with --config.file=/etc/prometheus/prometheus.yml",
    )
    here = f"{where}: prometheus"
    check_mounted(here, prometheus, "/etc/prometheus/prometheus.yml", MONITORING_DIR / "prometheus.yml")
    config = load_yaml(MONITORING_DIR / "prometheus.yml") or {}
    for rule_file in config.get("rule_files") or []:
        # Relative rule files are resolved from the configuration file's directory.
        check_mounted(here, prometheus, f"/etc/prometheus/{rule_file}", MONITORING_DIR / rule_file)

    grafana = services.get("grafana", {})
    check_mounted(
        f"{where}: grafana", grafana, "/etc/grafana/provisioning", MONITORING_DIR / "grafana/provisioning"
    )
    providers = load_yaml(MONITORING_DIR / "grafana/provisioning/dashboards/dashboards.yml") or {}
    for provider in providers.get("providers") or []:
        path = (provider.get("options") or {}).get("path")
        check_mounted(f"{where}: grafana", grafana, str(path), MONITORING_DIR / "grafana/dashboards")
    environment = grafana.get("environment") or {}
    if str(environment.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        check(
            environment.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer",
            f"{where}: grafana",
            "anonymous users may only view (GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer)",
        )


# ------------------------------------------------------------------------------------------------- kubernetes


def load_k8s() -> list[tuple[str, dict]]:
    objects = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects.append((path.name, document))
    return objects


def pod_specs(objects):
    for file, obj in objects:
        if obj.get("kind") in ("Deployment", "StatefulSet"):
            yield file, obj, obj["spec"]["template"]["spec"]


def check_k8s(objects: list[tuple[str, dict]], keda_schema: dict) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for file, obj in objects:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        by_kind.setdefault(kind, {})[name] = obj
        if kind in KEDA_KINDS:
            schema_errors(keda_schema, obj, f"{file}: {kind}/{name}")

    namespaces = set(by_kind.get("Namespace", {}))
    check(len(namespaces) == 1, "compose/k8s", f"expected one Namespace object, found {sorted(namespaces)}")
    for file, obj in objects:
        if obj.get("kind") != "Namespace":
            check(
                obj.get("metadata", {}).get("namespace") in namespaces,
                f"{file}: {obj.get('kind')}/{obj['metadata'].get('name')}",
                f"must be in the namespace {sorted(namespaces)}",
            )

    config_maps = {name: obj.get("data", {}) for name, obj in by_kind.get("ConfigMap", {}).items()}
    secrets = {name: {**obj.get("stringData", {}), **obj.get("data", {})} for name, obj in by_kind.get("Secret", {}).items()}
    claims = set(by_kind.get("PersistentVolumeClaim", {}))

    pod_labels = []
    for file, obj, spec in pod_specs(objects):
        where = f"{file}: {obj['kind']}/{obj['metadata']['name']}"
        labels = obj["spec"]["template"]["metadata"].get("labels", {})
        pod_labels.append(labels)
        selector = obj["spec"]["selector"].get("matchLabels", {})
        check(selector.items() <= labels.items(), where, "selector does not match the pod template's labels")
        for container in spec.get("containers", []):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef") or {}
                known = config_maps if "configMapRef" in source else secrets
                check(ref.get("name") in known, where, f"envFrom refers to a missing object {ref.get('name')}")
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check(
                        ref["key"] in secrets.get(ref["name"], {}),
                        where,
                        f"{variable['name']} refers to {ref['name']}/{ref['key']}, which is not defined",
                    )
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                check(claim in claims, where, f"volume refers to a missing PersistentVolumeClaim {claim}")

    for name, service in by_kind.get("Service", {}).items():
        selector = service["spec"].get("selector", {})
        check(
            any(selector.items() <= labels.items() for labels in pod_labels),
            f"Service/{name}",
            "selects no pod of the manifests",
        )

    deployments = by_kind.get("Deployment", {})
    for name in ("gptj-gateway", "gptj-worker"):
        deployment = deployments.get(name)
        if not check(deployment is not None, "compose/k8s", f"Deployment {name} missing"):
            continue
        spec = deployment["spec"]["template"]["spec"]
        check(spec.get("securityContext", {}).get("runAsNonRoot") is True, f"Deployment/{name}", "must run as non-root")

    worker = deployments.get("gptj-worker")
    if worker:
        where = "Deployment/gptj-worker"
        spec = worker["spec"]["template"]["spec"]
        limits = spec["containers"][0].get("resources", {}).get("limits", {})
        check(int(limits.get("nvidia.com/gpu", 0)) >= 1, where, "must request nvidia.com/gpu")
        check("replicas" not in worker["spec"], where, "must not set replicas: KEDA owns the count")
        check(spec.get("terminationGracePeriodSeconds", 30) >= 60, where, "grace period must cover a generation")

    namespace_setting = config_maps.get("gptj-config", {}).get("NAMESPACE", "gptj")
    auths = by_kind.get("TriggerAuthentication", {})
    scaled = by_kind.get("ScaledObject", {})
    check(bool(scaled), "compose/k8s", "no KEDA ScaledObject")
    for name, obj in scaled.items():
        where = f"ScaledObject/{name}"
        spec = obj.get("spec", {})
        check(spec.get("scaleTargetRef", {}).get("name") in deployments, where, "scaleTargetRef is not a Deployment here")
        lanes = {f"{namespace_setting}.jobs", f"{namespace_setting}.jobs.batch"}
        watched = set()
        for trigger in spec.get("triggers", []):
            if not check(trigger.get("type") == "rabbitmq", where, "expected a rabbitmq trigger"):
                continue
            meta = trigger.get("metadata", {})
            watched.add(meta.get("queueName"))
            check(
                meta.get("queueName") in lanes,
                where,
                f"queueName {meta.get('queueName')} is not the jobs queue of a lane ({', '.join(sorted(lanes))})",
            )
            # Over AMQP only ready messages are counted: busy workers would be scaled down mid-job.
            check(meta.get("protocol") == "http", where, "must read the management API (protocol: http)")
            check(meta.get("mode") == "QueueLength", where, "must scale on mode: QueueLength")
            check(
                str(meta.get("excludeUnacknowledged", "false")).lower() == "false",
                where,
                "must count unacknowledged (running) jobs",
            )
            auth_name = trigger.get("authenticationRef", {}).get("name")
            auth = auths.get(auth_name)
            if check(auth is not None, where, f"authenticationRef {auth_name} is not defined"):
                refs = auth.get("spec", {}).get("secretTargetRef", [])
                for ref in refs:
                    value = secrets.get(ref.get("name"), {}).get(ref.get("key"))
                    if check(value is not None, f"TriggerAuthentication/{auth_name}", f"{ref} is not defined"):
                        if ref.get("parameter") == "host":
                            check(
                                urlparse(value).scheme in ("http", "https"),
                                f"TriggerAuthentication/{auth_name}",
                                "host must be the management API's http(s) URL",
                            )
                check(
                    any(ref.get("parameter") == "host" for ref in refs),
                    f"TriggerAuthentication/{auth_name}",
                    "must provide the host parameter",
                )
        # Workers consume both lanes; a backlog on either must scale them.
        missing = sorted(lanes - watched)
        check(not missing, where, f"does not scale on every lane's queue: no trigger for {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------------- images


def check_diagrams() -> None:
    sources = sorted((ROOT / "img").glob("*.dot"))
    check(bool(sources), "img", "no diagram sources (*.dot)")
    for source in sources:
        for suffix in (".svg", ".png"):
            rendered = source.with_suffix(suffix)
            check(rendered.is_file() and rendered.stat().st_size > 0, "img", f"{rendered.name} missing (img/render.sh)")


# ------------------------------------------------------------------------------------------------- monitoring

PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
PROMQL_SELECTOR = re.compile(r'\b((?:gateway|worker)_[A-Za-z0-9_:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?')
PROMQL_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus adds to every series it scrapes (prometheus.yml's relabelling adds `service`).
TARGET_LABELS = {"job", "instance", "service"}


def macro_calls(text: str, macro: str):
    """The argument text of each `macro!(...)` call, parentheses balanced."""
    for match in re.finditer(rf"\b{macro}!\s*\(", text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            if text[index] == "(":
                depth += 1
            elif text[index] == ")":
                depth -= 1
                if depth == 0:
                    yield text[start:index]
                    break


def rust_metrics() -> tuple[dict[str, set[str]], set[str]] | None:
    """Metric names the Rust sources define (`pub const X: &str = "name"`), each with the label keys its
    `counter!`/`gauge!`/`histogram!` calls set, and which of them are histograms."""
    labels: dict[str, set[str]] = {}
    histograms: set[str] = set()
    for directory, prefix in METRIC_CRATES.items():
        if not check(directory.is_dir(), str(directory.relative_to(ROOT)), "missing: metric names come from it"):
            return None
        sources = [(path, path.read_text()) for path in sorted(directory.rglob("*.rs"))]
        constants: dict[str, str] = {}
        for path, text in sources:
            for const, name in re.findall(rf'pub const ([A-Z][A-Z0-9_]*): &str = "({prefix}[^"]*)";', text):
                constants[const] = name
                METRIC_FILES.add(str(path.relative_to(ROOT)))
        check(
            bool(constants),
            str(directory.relative_to(ROOT)),
            f'no `pub const X: &str = "{prefix}..."` metric names in the sources',
        )
        labels.update({name: set() for name in constants.values()})
        for _path, text in sources:
            for macro in ("counter", "gauge", "histogram"):
                for arguments in macro_calls(text, macro):
                    head = re.match(r"\s*(?:[A-Za-z_][A-Za-z0-9_]*::)*([A-Z][A-Z0-9_]*)\s*(?:,|$)", arguments)
                    if not head or head.group(1) not in constants:
                        continue
                    name = constants[head.group(1)]
                    labels[name] |= set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*=>', arguments))
                    if macro == "histogram":
                        histograms.add(name)
    return labels, histograms


def check_promql_metrics(
    expr: str, where: str, metrics: dict[str, set[str]], histograms: set[str], jobs: set[str]
) -> None:
    """Every gateway_/worker_ series `expr` selects is a metric of the Rust sources (histograms by their
    _bucket/_sum/_count series), matched on labels it has; every `job` it names is a scrape job."""
    seen = set()
    # String literals blanked out (same length, so positions match `expr`, where matchers are read).
    stripped = PROMQL_STRING.sub(lambda m: '"' + "_" * (len(m.group(0)) - 2) + '"', expr)
    for match in PROMQL_SELECTOR.finditer(stripped):
        name = match.group(1)
        # A label name in `by (...)` or a matcher is no metric: `worker_x="..."` is followed by an operator.
        if re.match(r"\s*(=~|!~|!=|=)", stripped[match.end(1):]):
            continue
        base, series_labels = name, set()
        if name not in metrics:
            suffix = next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            base = name[: -len(suffix)] if suffix else name
            if base not in metrics:
                if name not in seen:
                    files = ", ".join(sorted(METRIC_FILES))
                    fail(where, f"metric {name} is not defined in the Rust sources ({files})")
                seen.add(name)
                continue
            if base not in histograms:
                fail(where, f"{name}: {base} is not a histogram (it has no {suffix} series)")
                continue
            if suffix == "_bucket":
                series_labels = {"le"}
        if match.group(2):
            selector = expr[match.start(2) : match.end(2)]
            for label, _op, _value in PROMQL_MATCHER.findall(selector):
                allowed = metrics[base] | series_labels | TARGET_LABELS | {"__name__"}
                check(label in allowed, where, f"{name} has no label {label!r} (it has {sorted(allowed)})")
    # Any series (`up` too) selected by job must be of a job prometheus.yml scrapes.
    for label, op, value in PROMQL_MATCHER.findall(expr):
        if label == "job" and op == "=":
            check(
                json.loads(value) in jobs,
                where,
                f"job {json.loads(value)!r} is not a scrape job of prometheus.yml ({sorted(jobs)})",
            )


def grafana_expressions(node, where: str = "dashboard"):
    """(where, PromQL) for every query of a Grafana dashboard: targets' `expr`, template variables' queries."""
    if isinstance(node, dict):
        here = f"{where} / {node['title']}" if isinstance(node.get("title"), str) else where
        if isinstance(node.get("name"), str) and "query" in node:
            here = f"{where} / variable {node['name']}"
            query = node["query"]
            query = query.get("query") if isinstance(query, dict) else query
            if isinstance(query, str) and query:
                yield here, query
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield here, value
            elif isinstance(value, (dict, list)):
                yield from grafana_expressions(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from grafana_expressions(item, where)


def grafana_datasources(node):
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict):
            yield source
        elif isinstance(source, str):
            yield {"uid": source}
        for value in node.values():
            yield from grafana_datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from grafana_datasources(item)


def load_yaml(path: Path):
    where = str(path.relative_to(ROOT))
    if not check(path.is_file(), where, "missing"):
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        fail(where, f"not YAML: {error}")
        return None


def check_monitoring(models: list[dict], promtool: str | None) -> None:
    """The monitoring files: scrape targets against the compose services, alert rules' metadata, the
    dashboard's datasource, and every queried metric against the Rust sources."""
    prometheus = load_yaml(MONITORING_DIR / "prometheus.yml") or {}
    jobs = {}
    for job in prometheus.get("scrape_configs") or []:
        jobs[job.get("job_name")] = job
    where = "compose/monitoring/prometheus.yml"

    # Every gateway and worker service of the compose models is scraped on the port it serves metrics on.
    gateway, worker = jobs.get("gateway") or {}, jobs.get("worker") or {}
    gateway_targets = {t for sc in gateway.get("static_configs", []) for t in sc.get("targets", [])}
    worker_sd = [(n, sd.get("port")) for sd in worker.get("dns_sd_configs", []) for n in sd.get("names", [])]
    worker_sd += [tuple(t.split(":", 1)) for sc in worker.get("static_configs", []) for t in sc.get("targets", [])]
    check(bool(gateway and worker), where, f"needs scrape jobs `gateway` and `worker`, has {sorted(jobs)}")
    for model in models:
        for name, service in model.get("services", {}).items():
            environment = service.get("environment") or {}
            if "LISTEN" in environment and "AMQP_URL" in environment and "REDIS_URL" in environment:
                port = str(environment["LISTEN"]).rsplit(":", 1)[-1]
                check(f"{name}:{port}" in gateway_targets, where, f"job gateway does not scrape {name}:{port}")
            if environment.get("METRICS_LISTEN"):
                port = str(environment["METRICS_LISTEN"]).rsplit(":", 1)[-1]
                check(
                    any(n == name and str(p) == port for n, p in worker_sd),
                    where,
                    f"job worker does not scrape the service {name} on port {port} (METRICS_LISTEN)",
                )

    rules = load_yaml(MONITORING_DIR / "alerts.yml") or {}
    check(
        "alerts.yml" in [Path(r).name for r in prometheus.get("rule_files") or []],
        where,
        "rule_files must load alerts.yml",
    )
    expressions: list[tuple[str, str]] = []
    names = set()
    for group in rules.get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            here = f"compose/monitoring/alerts.yml: {name}"
            expressions.append((here, str(rule.get("expr", ""))))
            if "alert" not in rule:
                continue
            check(name not in names, here, "alert defined twice")
            names.add(name)
            check(rule.get("for") is not None, here, "needs a `for:` duration")
            check(
                (rule.get("labels") or {}).get("severity") in ("critical", "warning", "info"),
                here,
                "needs labels.severity: critical, warning or info",
            )
            for annotation in ("summary", "description"):
                present = bool((rule.get("annotations") or {}).get(annotation))
                check(present, here, f"needs annotations.{annotation}")
    check(bool(names), "compose/monitoring/alerts.yml", "no alerts")

    datasources = load_yaml(MONITORING_DIR / "grafana/provisioning/datasources/prometheus.yml") or {}
    uids = {d.get("uid") for d in datasources.get("datasources") or [] if d.get("type") == "prometheus"}
    check(
        len(uids) == 1 and None not in uids,
        "compose/monitoring/grafana/provisioning/datasources",
        f"expected one Prometheus datasource with a uid, got {uids}",
    )
    dashboard_dir = MONITORING_DIR / "grafana/dashboards"
    dashboards = sorted(dashboard_dir.glob("*.json"))
    check(bool(dashboards), str(dashboard_dir.relative_to(ROOT)), "no dashboard")
    for path in dashboards:
        here = str(path.relative_to(ROOT))
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            fail(here, f"not JSON: {error}")
            continue
        check(bool(dashboard.get("uid")), here, "needs a fixed uid (links to it must not break)")
        ids = [p.get("id") for p in dashboard.get("panels", [])]
        check(len(ids) == len(set(ids)), here, "panel ids must be unique")
        for source in grafana_datasources(dashboard):
            if source.get("type") in ("grafana", "datasource") or str(source.get("uid", "")).startswith("-- "):
                continue
            check(
                source.get("uid") in uids,
                here,
                f"datasource {source} is not the provisioned one (uid {sorted(map(str, uids))})",
            )
        found = list(grafana_expressions(dashboard, here))
        check(bool(found), here, "no queries")
        expressions += found

    metrics = rust_metrics()
    if metrics is not None:
        labels, histograms = metrics
        for here, expr in expressions:
            check_promql_metrics(expr, here, labels, histograms, set(jobs))
        used = " ".join(expr for _, expr in expressions)
        for name in ("gateway_queue_depth", "worker_time_to_first_token_seconds", "worker_generation_tokens_total"):
            check(name not in labels or name in used, "compose/monitoring", f"nothing watches {name}")

    if promtool:
        # The rules are promtool's own to check (scripts/check-deploy.sh); the dashboard's queries are not.
        dashboard = [(w, e) for w, e in expressions if not w.startswith("compose/monitoring/alerts.yml")]
        check_dashboard_promql(promtool, dashboard)


def check_dashboard_promql(promtool: str, expressions: list[tuple[str, str]]) -> None:
    """promtool parses the dashboard's queries, written as recording rules with Grafana's variables set."""
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for index, (_where, expr) in enumerate(expressions):
        if re.match(r"\s*label_values\(", expr):
            continue
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        command = [promtool, "check", "rules", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        rejected = sorted({int(i) for i in re.findall(r"dashboard:query_(\d+)", output)})
        named = [f"{expressions[i][0]}: {expressions[i][1]}" for i in rejected if i < len(expressions)]
        fail("grafana dashboard", "promtool rejects a query: " + ("; ".join(named) or output) + f"\n{output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose", required=True, help="the docker compose binary (v2)")
    parser.add_argument("--promtool", help="Prometheus's promtool, to parse the dashboard's queries")
    args = parser.parse_args()

    compose_schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    keda_schema = json.loads((SCHEMA_DIR / "keda-v1alpha1.json").read_text())

    check_compose_source(compose_schema)
    default = compose_config(args.compose, ["docker-compose.yml"], None)
    if default is not None:
        check_default_model(default)
    cpu = compose_config(args.compose, ["docker-compose.yml"], "cpu")
    if cpu is not None:
        check_cpu_model(cpu)
    per_gpu = compose_config(args.compose, COMPOSE_FILES, None)
    if per_gpu is not None:
        check_per_gpu_model(per_gpu)
    monitoring = compose_config(args.compose, ["docker-compose.yml"], "monitoring")
    if monitoring is not None:
        check_monitoring_model(monitoring)
    with_gpu = compose_config(args.compose, ["docker-compose.yml"], ["gpu", "monitoring"])
    if with_gpu is not None:
        check(
            {"worker", "prometheus", "grafana"} <= set(with_gpu.get("services", {})),
            "compose --profile gpu --profile monitoring",
            "must run the GPU worker and the monitoring services together",
        )
    models = [m for m in (default, cpu, per_gpu, monitoring) if m is not None]
    check_monitoring(models, args.promtool)

    check_k8s(load_k8s(), keda_schema)
    check_diagrams()

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
