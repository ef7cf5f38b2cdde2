#!/bin/sh
# Entry point of the stand-in rabbitmq image (compose/local-bases/rabbitmq.Dockerfile): writes the settings
# the official image derives from its environment, then runs the command (the node, as PID 1).
set -eu
{
  echo "loopback_users.guest = false"
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  if [ -n "${RABBITMQ_DEFAULT_USER-}" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER"; fi
  if [ -n "${RABBITMQ_DEFAULT_PASS-}" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS"; fi
} > /etc/rabbitmq/conf.d/10-defaults.conf
exec "$@"
