#!/bin/sh
# Entry point of the worker image: normalises the environment, then runs `worker` with the given arguments.
#
# - A setting that is present but empty counts as not set. Compose files and .env files write
#   `MAX_MEMORY=` or `${MAX_MEMORY:-}` for "not set", but the worker's flag parser takes an empty value as
#   given (and then rejects it).
# - With none of DEVICE, DEVICE_MAP or MAX_MEMORY (at most one may be given) the worker uses cuda:0 when it
#   sees a GPU, else the CPU; a deployment says which it means. DEFAULT_DEVICE (the GPU compose service sets `cuda`) is used as DEVICE when
#   none of the three is set, so a GPU worker uses its GPU without configuration and still accepts
#   MAX_MEMORY or DEVICE_MAP alone.
set -eu

for name in DEVICE DEVICE_MAP MAX_MEMORY DTYPE THREADS WORKER_ID DEFAULT_DEVICE; do
  eval "value=\${$name-}"
  if [ -z "$value" ]; then
    unset "$name"
  fi
done

if [ -n "${DEFAULT_DEVICE-}" ] && [ -z "${DEVICE-}${DEVICE_MAP-}${MAX_MEMORY-}" ]; then
  export DEVICE="$DEFAULT_DEVICE"
fi
unset DEFAULT_DEVICE

exec worker "$@"
