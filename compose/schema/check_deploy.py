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
- that every diagram source in img/ has its rendered SVG and PNG beside it.

Every failure is printed; the exit status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
SCHEMA_DIR = COMPOSE_DIR / "schema"
COMPOSE_FILES = ["docker-compose.yml", "one-worker-per-gpu.yml"]
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

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


def compose_config(compose: str, files: list[str], profile: str | None) -> dict | None:
    """The model `docker compose config` resolves, with defaults only (no variable of the caller's shell)."""
    command = [compose]
    for name in files:
        command += ["-f", str(COMPOSE_DIR / name)]
    if profile:
        command += ["--profile", profile]
    command += ["config", "--format", "json"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    label = " + ".join(files) + (f" --profile {profile}" if profile else "")
    if result.returncode != 0:
        fail(label, f"docker compose config failed: {result.stderr.strip()}")
        return None
    return json.loads(result.stdout)


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


def check_compose_source(schema: dict) -> None:
    for name in COMPOSE_FILES:
        path = COMPOSE_DIR / name
        if not check(path.is_file(), str(path.relative_to(ROOT)), "missing"):
            continue
        document = yaml.load(path.read_text(), Loader=ComposeLoader)
        schema_errors(schema, document, str(path.relative_to(ROOT)))
    env_file = COMPOSE_DIR / ".env"
    check(
        env_file.is_file() and re.search(r"^COMPOSE_PROFILES=gpu$", env_file.read_text(), re.M) is not None,
        "compose/.env",
        "must set COMPOSE_PROFILES=gpu, so that a plain `docker compose up` starts the GPU worker",
    )


def check_service_common(where: str, service: dict) -> None:
    check(service.get("restart") in ("unless-stopped", "always"), where, "needs restart: unless-stopped")
    check(service.get("logging", {}).get("options", {}).get("max-size") is not None, where, "logs must rotate")


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
        for trigger in spec.get("triggers", []):
            if not check(trigger.get("type") == "rabbitmq", where, "expected a rabbitmq trigger"):
                continue
            meta = trigger.get("metadata", {})
            check(
                meta.get("queueName") == f"{namespace_setting}.jobs",
                where,
                f"queueName {meta.get('queueName')} is not the jobs queue {namespace_setting}.jobs",
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


# ----------------------------------------------------------------------------------------------------- images


def check_diagrams() -> None:
    sources = sorted((ROOT / "img").glob("*.dot"))
    check(bool(sources), "img", "no diagram sources (*.dot)")
    for source in sources:
        for suffix in (".svg", ".png"):
            rendered = source.with_suffix(suffix)
            check(rendered.is_file() and rendered.stat().st_size > 0, "img", f"{rendered.name} missing (img/render.sh)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose", required=True, help="the docker compose binary (v2)")
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

    check_k8s(load_k8s(), keda_schema)
    check_diagrams()

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
