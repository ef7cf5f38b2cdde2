# syntax=docker/dockerfile:1.7
# The HTTP gateway: a static-enough Rust binary on a slim Debian runtime, run as an unprivileged user.
# Build context is the repository root:
#   docker build -f compose/gateway.Dockerfile -t gptj-gateway .
# (docker compose -f compose/docker-compose.yml build gateway does the same.)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the target directory between builds; the binary is copied out
# of the cached target directory in the same step, because the mount is gone in the next one.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=gptj-gateway-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p gateway \
    && install -D -m 0755 target/release/gateway /out/gateway

FROM ${RUNTIME_IMAGE}
# ca-certificates: amqps:// and rediss:// URLs; curl: the container healthcheck below. Versions come from the
# base image's Debian release, which is what pins them (see compose/.hadolint.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /var/lib/gateway/files
COPY --from=builder /out/gateway /usr/local/bin/gateway
USER 10001:10001
# The Batch API's files, when no S3 bucket is given (a volume in compose: the root file system is read-only).
ENV LISTEN=0.0.0.0:8000 \
    FILES_DIR=/var/lib/gateway/files \
    RUST_LOG=info
EXPOSE 8000
# Liveness only: /readyz also checks Redis and RabbitMQ, which compose and Kubernetes probe separately.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["gateway"]
