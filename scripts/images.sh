#!/usr/bin/env bash
# Builds every image compose/docker-compose.yml names, on a machine whose Docker engine cannot reach a
# registry. The project's images come from the project's Dockerfiles (compose/*.Dockerfile), built by the
# engine's BuildKit with their cache mounts; each base image they name that the engine does not have is made
# here under the same name from Debian's (and, for ubuntu:24.04, Ubuntu's) archive, so that the Dockerfiles
# and the compose file run as a user runs them. What is made, and what stands in for what:
#
#   debian:bookworm, debian:bookworm-slim   debootstrap (minbase) + docker import
#   ubuntu:24.04                            debootstrap of Ubuntu noble from archive.ubuntu.com + docker import
#   rust:1.95-bookworm                      compose/local-bases/rust.Dockerfile: debian:bookworm, the C
#                                           toolchain, and this machine's Rust toolchain (rustup's 1.95)
#   redis:7.4-alpine                        compose/local-bases/redis.Dockerfile (Debian's redis-server 7.0)
#   rabbitmq:4.1-management                 compose/local-bases/rabbitmq.Dockerfile (Debian's RabbitMQ 3.10)
#   prom/prometheus:v3.5.0                  compose/local-bases/prometheus.Dockerfile (Debian's Prometheus 2.42)
#   gptj-gateway:latest                     compose/gateway.Dockerfile
#   gptj-worker:cpu                         compose/worker.Dockerfile, the compose file's worker-cpu build
#   gptj-worker:builder                     compose/worker.Dockerfile's builder stage with the CUDA torch of
#                                           PyPI (the GPU image's): cargo build, the readelf check (--gpu)
#
# Not made: grafana/grafana (not packaged by Debian) and the CUDA runtime base of the GPU image
# (nvidia/cuda, NVIDIA's registry only); `--gpu` proves the GPU image's builder stage instead, and the CPU
# image runs the same entrypoint and binary layout.
#
# Every stand-in is made only if the engine lacks an image of that name, so a real image (pulled or loaded)
# always wins and a second run skips them (seconds). The project's images are always rebuilt: BuildKit's
# layer cache makes an unchanged tree a no-op, and its cache mounts (the cargo registry and target
# directories, pip's downloads) make a changed one an incremental build.
#
# Two differences from `docker compose build`, both forced by the missing registry, neither in the files:
# - the Dockerfiles' `# syntax=docker/dockerfile:1.7` line names a frontend image that would be pulled; the
#   Dockerfile is given to BuildKit without that line, so the engine's built-in frontend reads it;
# - the CPU worker's torch comes from TORCH_INDEX_URL_CPU: the compose file's CPU index
#   (download.pytorch.org) when it answers, else PyPI, whose torch 2.11 wheel (CUDA build, ~4 GB with its
#   nvidia-* wheels) runs on the CPU too: a bigger image, the same worker.
# The docker CLI plugins this needs (buildx: the client's BuildKit driver; compose v2) are installed from
# Debian trixie's packages into ~/.docker/cli-plugins when the docker client lacks them.
#
#   scripts/images.sh            # bases + gateway + CPU worker + Prometheus
#   scripts/images.sh --gpu      # also the GPU worker's builder stage (a second worker build, ~25 min)
#
# Cost on a fresh machine of 2 cores (figures in docs/deployment.md, "Images without a registry").
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

GPU=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    *) echo "usage: scripts/images.sh [--gpu]" >&2; exit 2 ;;
  esac
done

# Where debootstrap's downloads and root filesystems go (kept: a rerun that must remake a base reuses them).
WORK="${IMAGES_WORK:-/var/tmp/gptj-images}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
UBUNTU_MIRROR="${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
RUST_VERSION=1.95.0
# The images the compose file names; overridable the way the compose file's ${..._IMAGE} are.
GATEWAY_IMAGE="${GATEWAY_IMAGE:-gptj-gateway:latest}"
WORKER_CPU_IMAGE="${WORKER_CPU_IMAGE:-gptj-worker:cpu}"
WORKER_BUILDER_IMAGE="${WORKER_BUILDER_IMAGE:-gptj-worker:builder}"
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Debian trixie's builds of the docker CLI plugins: file under the pool, and its SHA-256.
COMPOSE_DEB=(pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb
  47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea)
BUILDX_DEB=(pool/main/d/docker-buildx/docker-buildx_0.13.1+ds1-3_amd64.deb
  fcf8c48204d1603c8f209451d7827eb91bf30759578baf7704e9e1a87e5f1d7f)
# Ubuntu's archive keyring (ubuntu-keyring 2023.11.28.1, not packaged by Debian) and its SHA-256.
UBUNTU_KEYRING_DEB=(pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
  36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8)

export DOCKER_BUILDKIT=1
mkdir -p "$WORK"
START_S=$SECONDS
step_start() { STEP_S=$SECONDS; log "$*"; }
step_done() { log "$1: $((SECONDS - STEP_S)) s"; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# Downloads pool file $1 of mirror $3 to $WORK and checks its SHA-256 ($2); prints the local path.
fetch_deb() {
  local file
  file="$WORK/$(basename "$1")"
  if [ ! -f "$file" ] || ! echo "$2  $file" | sha256sum -c --quiet - >/dev/null 2>&1; then
    curl -fsS --retry 3 -o "$file.part" "$3/$1"
    echo "$2  $file.part" | sha256sum -c --quiet - || { echo "checksum mismatch: $3/$1" >&2; exit 1; }
    mv "$file.part" "$file"
  fi
  echo "$file"
}

ensure_cli_plugins() {
  local plugin deb dir
  dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  for plugin in compose buildx; do
    docker "$plugin" version >/dev/null 2>&1 && continue
    log "docker $plugin: installing Debian trixie's docker-$plugin into $dir"
    if [ "$plugin" = compose ]; then
      deb="$(fetch_deb "${COMPOSE_DEB[@]}" "$DEBIAN_MIRROR")"
    else
      deb="$(fetch_deb "${BUILDX_DEB[@]}" "$DEBIAN_MIRROR")"
    fi
    rm -rf "$WORK/plugin" && mkdir -p "$WORK/plugin" "$dir"
    dpkg-deb -x "$deb" "$WORK/plugin"
    install -m 0755 "$WORK/plugin/usr/libexec/docker/cli-plugins/docker-$plugin" "$dir/"
    docker "$plugin" version
  done
}

# debootstrap SUITE MIRROR [debootstrap args...] into $WORK/rootfs-SUITE, then `docker import` as each
# further name. Apt gets the suite's updates and security sources, and the policy-rc.d that Docker's
# official Debian and Ubuntu images carry (packages' maintainer scripts start no services in a build).
import_rootfs() {
  local suite="$1" mirror="$2" sources="$3" rootfs="$WORK/rootfs-$1"
  shift 3
  local -a names=()
  while [ "$1" != -- ]; do names+=("$1"); shift; done
  shift
  if [ ! -x "$rootfs/bin/sh" ] || [ ! -f "$rootfs/.complete" ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    rm -rf "$rootfs"
    # Debian's debootstrap may predate the Ubuntu release: its script for every Ubuntu since gutsy is one.
    local -a script=()
    [ -e "/usr/share/debootstrap/scripts/$suite" ] || script=(/usr/share/debootstrap/scripts/gutsy)
    debootstrap --variant=minbase "$@" "$suite" "$rootfs" "$mirror" "${script[@]}" >"$WORK/debootstrap-$suite.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap-$suite.log" >&2; exit 1; }
    printf '%s\n' "$sources" >"$rootfs/etc/apt/sources.list"
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  # The certificate authorities this machine adds to Debian's (update-ca-certificates' local directory), e.g.
  # a TLS-inspecting egress proxy's: without them the builds' cargo and pip could not reach crates.io and
  # PyPI from where this machine can. ca-certificates, which the images install, adds them to the system
  # bundle, and pip (which otherwise trusts only its own copy of certifi) is pointed at that bundle.
  rm -rf "$rootfs/usr/local/share/ca-certificates" "$rootfs/etc/pip.conf"
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  fi
  local name
  for name in "${names[@]}"; do
    tar --numeric-owner --exclude=./.complete -C "$rootfs" -c . \
      | docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$name" >/dev/null
  done
}

ensure_debian() {
  have_image debian:bookworm && have_image debian:bookworm-slim && return
  step_start "debian:bookworm, debian:bookworm-slim: debootstrap bookworm + docker import"
  import_rootfs bookworm "$DEBIAN_MIRROR" \
    "deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main" \
    debian:bookworm debian:bookworm-slim --
  step_done debian
}

ensure_ubuntu() {
  have_image ubuntu:24.04 && return
  step_start "ubuntu:24.04: debootstrap noble + docker import"
  local deb
  deb="$(fetch_deb "${UBUNTU_KEYRING_DEB[@]}" "$UBUNTU_MIRROR")"
  rm -rf "$WORK/ubuntu-keyring" && dpkg-deb -x "$deb" "$WORK/ubuntu-keyring"
  import_rootfs noble "$UBUNTU_MIRROR" \
    "deb $UBUNTU_MIRROR noble main universe
deb $UBUNTU_MIRROR noble-updates main universe
deb $UBUNTU_MIRROR noble-security main universe" \
    ubuntu:24.04 -- --keyring="$WORK/ubuntu-keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg"
  step_done ubuntu
}

# The Rust image: this machine's toolchain of RUST_VERSION (rustup's) copied into the context.
ensure_rust() {
  local image="rust:${RUST_VERSION%.*}-bookworm" sysroot ctx
  have_image "$image" && return
  step_start "$image: debian:bookworm + this machine's Rust $RUST_VERSION"
  sysroot="$(rustc "+$RUST_VERSION" --print sysroot 2>/dev/null || true)"
  if [ -z "$sysroot" ] || ! "$sysroot/bin/rustc" --version | grep -q "^rustc $RUST_VERSION "; then
    echo "no Rust $RUST_VERSION toolchain here (rustup toolchain install $RUST_VERSION)" >&2
    exit 1
  fi
  ctx="$WORK/rust-context"
  rm -rf "$ctx" && mkdir -p "$ctx/toolchain"
  cp compose/local-bases/rust.Dockerfile "$ctx/Dockerfile"
  # bin, lib and libexec: the compilers and the standard library; share/ is documentation.
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  [ ! -d "$sysroot/libexec" ] || cp -a "$sysroot/libexec" "$ctx/toolchain/"
  docker build -q --build-arg "RUST_VERSION=$RUST_VERSION" -t "$image" "$ctx" >/dev/null
  rm -rf "$ctx"
  step_done rust
}

# A stand-in service image from compose/local-bases/NAME.Dockerfile (context: that directory).
ensure_local_base() {
  local image="$1" name="$2"
  have_image "$image" && return
  step_start "$image: compose/local-bases/$name.Dockerfile"
  docker build -q -f "compose/local-bases/$name.Dockerfile" -t "$image" compose/local-bases >/dev/null
  step_done "$name"
}

# docker build NAME: a project Dockerfile ($1) without its `# syntax=` line (see the header), the context
# the repository root as in the compose file; the log goes to $WORK/build-NAME.log (its end is printed when
# the build fails) and a line with the time taken to stderr.
build_project() {
  local dockerfile="$1" name="$2" started=$SECONDS status
  shift 2
  set +e
  sed '1{/^# syntax=/d}' "$dockerfile" | docker build --progress=plain -f - "$@" . >"$WORK/build-$name.log" 2>&1
  status=("${PIPESTATUS[@]}")
  set -e
  if [ "${status[1]}" != 0 ]; then
    grep -vE '^#[0-9]+ [0-9.]+ +(Compiling|Downloaded|Downloading|Fresh) ' "$WORK/build-$name.log" | tail -40 >&2
    echo "$name: docker build -f $dockerfile $* failed (log: $WORK/build-$name.log)" >&2
    return 1
  fi
  log "$name: built in $((SECONDS - started)) s (log: $WORK/build-$name.log)"
}

ensure_cli_plugins
ensure_debian
ensure_ubuntu
ensure_rust
ensure_local_base redis:7.4-alpine redis
ensure_local_base rabbitmq:4.1-management rabbitmq
ensure_local_base prom/prometheus:v3.5.0 prometheus

TORCH_INDEX_URL_CPU="${TORCH_INDEX_URL_CPU:-}"
if [ -z "$TORCH_INDEX_URL_CPU" ]; then
  if curl -fsS -m 10 -o /dev/null "$CPU_TORCH_INDEX/torch/"; then
    TORCH_INDEX_URL_CPU="$CPU_TORCH_INDEX"
  else
    TORCH_INDEX_URL_CPU=https://pypi.org/simple
    log "$CPU_TORCH_INDEX does not answer: the CPU worker gets PyPI's torch (the CUDA build; it runs on the CPU)"
  fi
fi

# The gateway and the CPU worker build side by side: the worker's downloads (torch and its wheels, GBs)
# overlap the gateway's compilation.
log "$GATEWAY_IMAGE (compose/gateway.Dockerfile) and $WORKER_CPU_IMAGE (compose/worker.Dockerfile, RUNTIME_IMAGE=ubuntu:24.04, torch from $TORCH_INDEX_URL_CPU)"
build_project compose/gateway.Dockerfile gateway -t "$GATEWAY_IMAGE" &
GATEWAY_BUILD=$!
build_project compose/worker.Dockerfile worker-cpu -t "$WORKER_CPU_IMAGE" \
  --build-arg RUNTIME_IMAGE=ubuntu:24.04 --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL_CPU" &
WORKER_BUILD=$!
FAILED=0
wait "$GATEWAY_BUILD" || FAILED=1
wait "$WORKER_BUILD" || FAILED=1
[ "$FAILED" = 0 ] || exit 1

if [ "$GPU" = 1 ]; then
  # The GPU image's builder stage as the compose file's `worker` service builds it (PyPI's CUDA torch): the
  # release build and the check that the binary links libtorch_cuda.so. With TORCH_INDEX_URL_CPU on PyPI this
  # is the CPU image's builder stage, already built.
  build_project compose/worker.Dockerfile worker-builder --target builder -t "$WORKER_BUILDER_IMAGE"
fi

log "images ready in $((SECONDS - START_S)) s"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
  | grep -E '^(gptj-|debian:bookworm|ubuntu:24.04|rust:|redis:|rabbitmq:|prom/prometheus:)' >&2
