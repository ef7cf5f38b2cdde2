# syntax=docker/dockerfile:1.7
# The GPU worker: the Rust `worker` binary over libtorch, on a CUDA runtime image, run as an unprivileged user.
# Build context is the repository root:
#   docker build -f compose/worker.Dockerfile -t gptj-worker .
# libtorch comes from PyPI's `torch` wheel (tch is built with LIBTORCH_USE_PYTORCH=1), so the image carries the
# exact libtorch the binary was linked against. torch 2.11.0 on PyPI is built for CUDA 13.0 and needs an NVIDIA
# driver >= 580 on the host. Other builds of the same torch version (older CUDA for older drivers or GPUs, or
# CPU only) come from the PyTorch package index: set TORCH_INDEX_URL, and RUNTIME_IMAGE to a matching base
# (docs/deployment.md, "Images").

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

FROM ${RUST_IMAGE} AS builder
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The pip cache mount is shared with the runtime stage below: the nvidia-* wheels, most of the download, come
# once (the torch wheel itself differs, the two stages have different Pythons).
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python3 -m venv /opt/torch \
    && /opt/torch/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
ENV PATH=/opt/torch/bin:${PATH} \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
# The linker's --as-needed (rustc's default) drops libtorch_cuda.so from the binary's dependencies, because no
# symbol of it is referenced directly: CUDA support registers itself from that library's static constructors.
# Without it the binary runs, but on the CPU only, with no error. worker/build.rs links it with
# -Wl,--no-as-needed whenever the libtorch it builds against has it; this step proves it did, so an image
# that would silently ignore its GPUs cannot be built. (A CPU-only torch has no libtorch_cuda.so to check.)
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=gptj-worker-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p worker \
    && install -D -m 0755 target/release/worker /out/worker \
    && torch_lib="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
    && if [ -e "${torch_lib}/libtorch_cuda.so" ]; then \
        readelf -d /out/worker | grep -q 'NEEDED.*libtorch_cuda\.so' \
            || { echo "worker is not linked against libtorch_cuda.so: CUDA would be unavailable" >&2; exit 1; }; \
    fi

FROM ${RUNTIME_IMAGE}
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The same torch wheel as the builder; /opt/torch/site-packages is a stable name for the interpreter-versioned
# site-packages directory. libtorch finds the CUDA libraries of its pip dependencies (nvidia-*) through its
# own RPATH relative to that directory, so only torch/lib goes on LD_LIBRARY_PATH.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python3 -m venv /opt/torch \
    && /opt/torch/bin/pip install --no-compile --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && ln -s "$(/opt/torch/bin/python -c 'import site; print(site.getsitepackages()[0])')" /opt/torch/site-packages \
    && test -e /opt/torch/site-packages/torch/lib/libtorch.so \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin worker \
    && install -d -o 10001 -g 10001 /models
COPY --from=builder /out/worker /usr/local/bin/worker
COPY --chmod=0755 compose/worker-entrypoint.sh /usr/local/bin/worker-entrypoint
ENV LD_LIBRARY_PATH=/opt/torch/site-packages/torch/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}} \
    MODEL_DIR=/models \
    RUST_LOG=info
USER 10001:10001
WORKDIR /home/worker
# SIGTERM makes the worker stop taking jobs and finish the one in hand; give it the time (compose:
# stop_grace_period, Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# worker-entrypoint: empty settings count as unset, DEFAULT_DEVICE applies when no placement is given.
ENTRYPOINT ["worker-entrypoint"]
CMD ["serve"]
