# syntax=docker/dockerfile:1
# The single-container shape: the official vLLM image, with the gateway in front of it in a
# virtual environment of its own. vLLM pins its own aiohttp and pydantic (and much else); the
# gateway's dependencies never touch the image's Python, and vLLM never sees the gateway's.
#
#   docker build -f deploy/images/vllm.Dockerfile -t vllm-guard-vllm:0.1.0 .
#
# The gateway is the entry point and starts vLLM itself (`engine.command` in config.yaml,
# deploy/single/), watches it, restarts a dead engine without restarting the pod, and stops it
# on SIGTERM after draining. tini as PID 1 reaps the engine's orphaned children (vLLM's
# workers) when the engine dies.

# The vLLM release the project tests against: the `engine` extra's pin in pyproject.toml
# (tests/deploy/test_images.py keeps the two equal).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/vllm-guard/
COPY gateway /src/vllm-guard/gateway
COPY engine /src/vllm-guard/engine
# The gateway's own environment, made with the image's Python but sharing none of its
# packages (--without-pip: Ubuntu's python may lack ensurepip; the image's pip installs into it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv --without-pip /opt/vllm-guard \
 && python3 -m pip --python /opt/vllm-guard/bin/python install /src/vllm-guard \
 && rm -rf /src/vllm-guard \
 && /opt/vllm-guard/bin/vllm-guard --help >/dev/null \
 && groupadd --system --gid 10001 vllm-guard \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vllm-guard \
      --shell /usr/sbin/nologin vllm-guard \
 && mkdir -p /etc/vllm-guard
# A working default; in Kubernetes the ConfigMap of deploy/single/ is mounted over it.
COPY deploy/images/config.single.yaml /etc/vllm-guard/config.yaml
# /opt/vllm-guard/bin is deliberately NOT on PATH: `vllm` and `python3` in engine.command
# must be the image's, with vLLM's packages. The entry point names the gateway by full path.
# HF_HOME: the engine's caches in the non-root user's home (or a mounted volume).
ENV VLLM_GUARD_CONFIG=/etc/vllm-guard/config.yaml \
    HF_HOME=/home/vllm-guard/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/vllm-guard
# Only the gateway's port: the engine listens on 127.0.0.1 inside the container.
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/vllm-guard/bin/vllm-guard"]
CMD ["run"]
