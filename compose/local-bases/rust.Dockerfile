# Stand-in for Docker Hub's rust:<version>-bookworm, made by scripts/images.sh where no registry can be
# reached: Debian bookworm with the C toolchain and libraries the official image (buildpack-deps) brings that
# the workspace's build scripts use (cc/c++ for aws-lc-sys, zstd-sys, mimalloc and torch-sys; readelf for the
# worker image's libtorch_cuda check), and a Rust toolchain copied from the machine that builds it (the
# context's toolchain/ directory), laid out as the official image lays it out: CARGO_HOME=/usr/local/cargo
# (the Dockerfiles' cache mounts point at its registry/), RUSTUP_HOME=/usr/local/rustup, cargo on PATH.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        binutils bzip2 ca-certificates curl file g++ gcc git libc6-dev libssl-dev make patch pkg-config \
        procps unzip xz-utils \
    && rm -rf /var/lib/apt/lists/*
ARG RUST_VERSION
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=${RUST_VERSION}
COPY toolchain/ /usr/local/rustup/toolchains/${RUST_VERSION}-x86_64-unknown-linux-gnu/
RUN mkdir -p "${CARGO_HOME}/bin" \
    && for tool in cargo rustc rustdoc; do \
        ln -s "${RUSTUP_HOME}/toolchains/${RUST_VERSION}-x86_64-unknown-linux-gnu/bin/${tool}" "${CARGO_HOME}/bin/${tool}"; \
    done \
    && chmod -R a+w "${RUSTUP_HOME}" "${CARGO_HOME}" \
    && cargo --version && rustc --version
