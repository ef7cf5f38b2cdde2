#!/bin/sh
# Entry point of the stand-in rabbitmq image (compose/local-bases/rabbitmq.Dockerfile): writes the settings
# the official image derives from its environment, then runs the command. The node is started without
# Debian's wrapper (/usr/sbin/rabbitmq-server), which would keep a shell as PID 1 (SIGTERM from `docker stop`
# would not reach the node) and send the node's log to files instead of `docker logs`.
set -eu
{
  echo "loopback_users.guest = false"
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  if [ -n "${RABBITMQ_DEFAULT_USER-}" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER"; fi
  if [ -n "${RABBITMQ_DEFAULT_PASS-}" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS"; fi
} > /etc/rabbitmq/conf.d/10-defaults.conf
if [ "${1-}" = rabbitmq-server ]; then
  shift
  cd /var/lib/rabbitmq
  exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
