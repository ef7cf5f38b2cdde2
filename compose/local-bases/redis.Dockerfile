# Stand-in for Docker Hub's redis image, made by scripts/images.sh where no registry can be reached: Debian's
# redis-server (bookworm: 7.0) behaving as the official image does for compose/docker-compose.yml: data and
# the append-only file in /data (a volume), `redis-server ARGS...` as the command, redis-cli for the
# healthcheck, protected mode off (the official build turns it off: the port is reached only on the compose
# network, and a protected Redis refuses every client that is not on its loopback).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis -m 0750 /data
COPY --chmod=0755 redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
# The package's system user, whose id the package picks when it is installed.
# hadolint ignore=DL3066
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
