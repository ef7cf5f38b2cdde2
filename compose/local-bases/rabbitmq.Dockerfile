# Stand-in for Docker Hub's rabbitmq:<version>-management image, made by scripts/images.sh where no registry
# can be reached: Debian's rabbitmq-server (bookworm: 3.10, the version this project's tests run against)
# with the management plugin, behaving as the official image does for compose/docker-compose.yml: the node
# runs as user rabbitmq, keeps its data in /var/lib/rabbitmq (a volume) under the node name rabbit@HOSTNAME,
# creates RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS on first start, listens for AMQP on 5672 and for the
# management UI on 15672 on every interface, and rabbitmq-diagnostics works in `docker exec` (healthchecks).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* \
    && rabbitmq-plugins enable --offline rabbitmq_management \
    && install -d -o rabbitmq -g rabbitmq -m 0750 /var/lib/rabbitmq /var/log/rabbitmq \
    && install -d -o rabbitmq -g rabbitmq /etc/rabbitmq/conf.d \
    && chown rabbitmq:rabbitmq /etc/rabbitmq/enabled_plugins
COPY --chmod=0755 rabbitmq-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# HOME: the CLI tools (rabbitmq-diagnostics) find the node's Erlang cookie in $HOME/.erlang.cookie.
ENV HOME=/var/lib/rabbitmq \
    RABBITMQ_LOGS=- \
    RABBITMQ_CONFIG_FILES=/etc/rabbitmq/conf.d
VOLUME /var/lib/rabbitmq
# The package's system user, whose id the package picks when it is installed.
# hadolint ignore=DL3066
USER rabbitmq
EXPOSE 5672 15672
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
