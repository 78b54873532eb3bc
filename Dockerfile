# syntax=docker/dockerfile:1
# The oribus image: every server role (bus, shard, cluster init) and the CLI.
#
#   docker build -t oribus:dev .
#   docker run --rm -p 7700:7700 -p 7780:7780 oribus:dev      # `oribus up`: bus + 2 shards
#   docker run --rm oribus:dev shard --help                   # any other subcommand
#
# deploy/k8s runs it as uid 10001 with a read-only root filesystem: every
# writable path is a mounted volume (/var/lib/oribus, /tmp).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a wheel of this tree, installed with its dependencies into /opt/venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY oribus ./oribus
# Only the runtime dependencies and `oribus verify`'s (Hypothesis): the test and dev extras
# are not installed.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install "$(echo /wheels/oribus-*.whl)[verify]"

# ---- runtime: the venv on a slim Python, no build tools, not root
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="oribus" \
      org.opencontainers.image.description="A distributed state bus for fleets of agents" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 oribus \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /var/lib/oribus --shell /usr/sbin/nologin oribus \
 && mkdir -p /var/lib/oribus \
 && chown 10001:10001 /var/lib/oribus
# Same path as in the builder: the venv's scripts name /opt/venv/bin/python.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/oribus
# Numeric, so Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
# 7700 bus gRPC, 7780 bus HTTP, 7801 shard gRPC
EXPOSE 7700 7701 7780 7801 7802
ENTRYPOINT ["oribus"]
CMD ["up", "--listen", "0.0.0.0:7700", "--http", "0.0.0.0:7780", "--data-dir", "/var/lib/oribus/data"]
