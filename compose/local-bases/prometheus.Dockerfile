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
    && install -d -o 65534 -g 65534 /prometheus
VOLUME /prometheus
WORKDIR /prometheus
# nobody, as the official image runs; its id is Debian's fixed 65534.
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
