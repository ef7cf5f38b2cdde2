#!/usr/bin/env bash
# Prepares what scripts/gpu-check.sh needs on a GPU machine that has python3 + torch 2.11 but no network:
# the release worker binary (linked against libtorch_cuda, see worker/build.rs) and the gateway (for the
# service run) in target/gpu-bundle/, and transformers 4.55.4 with the two versions it pins as wheels in
# .whl/ (git-ignored via .git/info/exclude). Redis and RabbitMQ are not bundled: the service run needs them
# on the GPU machine.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_venv
build_release
mkdir -p target/gpu-bundle
strip -o target/gpu-bundle/worker target/release/worker
strip -o target/gpu-bundle/gateway target/release/gateway
ldd target/gpu-bundle/worker | grep -q libtorch_cuda || { echo "libtorch_cuda is not linked" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl transformers==4.55.4 huggingface_hub==0.36.2 tokenizers==0.21.4
du -sh target/gpu-bundle .whl
