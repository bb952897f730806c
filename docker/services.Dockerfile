# The third-party services of the compose network, built from the same local base as
# the role images (no registry here): Kafka (KRaft) from the jars scripts/services
# caches, go-waku from the binary it builds, Debian's redis-server and prometheus.
# Context: build/services-context (tools/images.py --services stages kafka-libs/ and
# waku into it). Non-root, read-only root friendly (state only under /data).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS svc-base
RUN groupadd --system --gid 10002 svc \
 && useradd --system --uid 10002 --gid 10002 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin svc \
 && mkdir -p /data && chown 10002:10002 /data
WORKDIR /data

FROM svc-base AS kafka
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openjdk-17-jre-headless \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY kafka-libs /opt/kafka/libs
COPY kafka-entrypoint.sh /opt/kafka/entrypoint.sh
USER 10002:10002
ENV KAFKA_HEAP=-Xmx384m
EXPOSE 9092
ENTRYPOINT ["/bin/sh", "/opt/kafka/entrypoint.sh"]

FROM svc-base AS waku
COPY waku /usr/local/bin/waku
USER 10002:10002
ENTRYPOINT ["/usr/local/bin/waku"]

FROM svc-base AS redis
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
USER 10002:10002
ENTRYPOINT ["redis-server"]
CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes", "--appendfsync", "always", "--save", ""]

FROM svc-base AS prometheus
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
USER 10002:10002
ENTRYPOINT ["/usr/bin/prometheus"]
