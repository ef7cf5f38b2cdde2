# Stand-in for Docker Hub's prom/prometheus image, made by scripts/images.sh where no registry can be
# reached: Debian's prometheus (bookworm: 2.42; compose/monitoring/prometheus.yml reads the same in 2 and 3)
# behaving as the official image does for compose/docker-compose.yml: `prometheus` is the entry point and
# the compose file's command its flags, it runs as nobody with its database in /prometheus (a volume), and
# wget answers the healthcheck.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o nobody -g nogroup /prometheus
VOLUME /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
