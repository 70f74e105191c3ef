# syntax=docker/dockerfile:1
# The gateway alone: the image of the sidecar shape's `vllm-guard` container.
#
#   docker build -f deploy/images/gateway.Dockerfile -t vllm-guard:0.1.0 .
#   docker run --rm -v "$PWD/deploy/sidecar:/etc/vllm-guard:ro" vllm-guard:0.1.0 check-config
#
# Small (python slim, no compiler in the final stage), non-root (uid 10001), tini as PID 1,
# and the config path from VLLM_GUARD_CONFIG (the ConfigMap's mount). Listeners, ports and
# timeouts stay in config.yaml, never in the image.
# tests/deploy/test_images.py checks this file statically and installs the package the same
# way into a fresh virtual environment, then runs its console script as a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only what the package needs: pyproject.toml, README.md (its readme) and the two packages.
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY engine /src/engine
RUN python -m venv /opt/vllm-guard \
 && /opt/vllm-guard/bin/pip install /src \
 && /opt/vllm-guard/bin/vllm-guard --help >/dev/null

FROM ${PYTHON_IMAGE}
# tini reaps orphans and forwards SIGTERM to the gateway, which drains (server.shutdown_grace_s)
# and exits 0. No -g: the gateway decides when its engine (if it supervises one) is stopped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vllm-guard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vllm-guard \
 && mkdir -p /etc/vllm-guard
COPY --from=build /opt/vllm-guard /opt/vllm-guard
# The ConfigMap is mounted at /etc/vllm-guard as a directory (never subPath), so that its
# symlink swap reaches the gateway and the policy reloads live.
COPY deploy/images/config.default.yaml /etc/vllm-guard/config.yaml
ENV VLLM_GUARD_CONFIG=/etc/vllm-guard/config.yaml \
    PATH=/opt/vllm-guard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The client port (server.port). The admin listener (admin.port, 8081) is loopback by default
# and not exposed; the engine's port belongs to the engine's container.
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/vllm-guard/bin/vllm-guard"]
CMD ["run"]
