#!/bin/sh
# Entry point of the stand-in redis image (compose/local-bases/redis.Dockerfile): a `redis-server` command
# gets `--protected-mode no` first, as the official image's build does; its own arguments follow and win.
set -eu
if [ "${1-}" = redis-server ]; then
  shift
  exec redis-server --protected-mode no "$@"
fi
exec "$@"
