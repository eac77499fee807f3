# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target engine  -t soberana/engine:0.1.0 .    CUDA, torch, the whole stack
#   docker build --target gateway -t soberana/gateway:0.1.0 .   gateway, bench, telemetry; no torch
# docker-compose.yaml and deploy/helm/soberana use both.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

# ---- engine: `soberana serve` on NVIDIA GPUs -----------------------------------------------
FROM ${CUDA_IMAGE} AS engine
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# gcc and Python headers stay in the image: Triton compiles its kernel launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# torch first, from its CUDA index, so the package install below keeps it (and its Triton).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md /src/
COPY soberana /src/soberana
RUN pip install "/src[serve,redis,telemetry,tracing]" && useradd --uid 1000 --create-home soberana
USER soberana
WORKDIR /home/soberana
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20m \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["soberana"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--log-format", "json"]

# ---- gateway: the gateway, `soberana bench` and `soberana telemetry`, without torch ----------
FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY soberana /src/soberana
# The extras of these commands carry no torch; transformers (without torch) gives the bench
# exact token counts. tests/deploy/test_images.py checks this covers what they import.
RUN pip install "/src[gateway,bench,plots,telemetry,tracing]" transformers tokenizers \
 && useradd --uid 1000 --create-home soberana
USER soberana
WORKDIR /home/soberana
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/metrics', timeout=4)"
ENTRYPOINT ["soberana"]
CMD ["gateway", "--config", "/etc/soberana/gateway.yaml", "--log-format", "json"]
