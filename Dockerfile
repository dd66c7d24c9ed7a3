# syntax=docker/dockerfile:1
#
# cellserve serving image. Two variants from one file, picked by a build argument:
#
#   GPU (default): docker build -t cellserve:gpu .
#     runtime on NVIDIA's CUDA 13 + cuDNN 9 runtime image (onnxruntime-gpu 1.31.1's PyPI wheel links
#     libcudart.so.13 / libcublas.so.13), the `gpu` extra only.
#   CPU:           docker build --build-arg VARIANT=cpu -t cellserve:cpu .
#     runtime on python:3.11-slim, the `serve` extra.
#
# Neither runtime stage has torch, a compiler, or pip caches. The shipped model lives at
# /models/default (CELLSERVE_MODEL_DIRS points there); mount another model directory over it, or mount
# models elsewhere and set CELLSERVE_MODEL_DIRS='["/models/a","/models/b"]'. See deploy/README.md.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: the wheel (pure Python; generated stubs and the shipped model are package data) -------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY model ./model
COPY client ./client
RUN python -m build --wheel --outdir /wheels . \
    && python -c "import sys, zipfile, glob; n = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); \
sys.exit(0 if 'cellserve/model/default/manifest.json' in n else 'wheel lacks the shipped model (cellserve/model/default)')"

# ---- runtime bases: the interpreter only -----------------------------------------------------------
FROM ${CUDA_IMAGE} AS base-gpu
ENV SERVING_EXTRA=gpu \
    CELLSERVE_DEVICE=cuda
# Ubuntu 24.04's Python 3.12 with venv support; no pip, no compilers, no docs. Package versions follow the
# pinned base image's Ubuntu release (pinning apt versions breaks as soon as the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE} AS base-cpu
ENV SERVING_EXTRA=serve \
    CELLSERVE_DEVICE=cpu

# ---- venv: install the wheel with its serving extra, move the model to /models/default -------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS venv
COPY --from=builder /wheels /wheels
RUN python3 -m venv /opt/cellserve \
    && /opt/cellserve/bin/pip install --no-cache-dir "$(ls /wheels/cellserve-*.whl)[${SERVING_EXTRA}]" \
    && /opt/cellserve/bin/pip uninstall -y pip \
    && site="$(/opt/cellserve/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p /models \
    && mv "${site}/cellserve/model/default" /models/default \
    && ln -s /models/default "${site}/cellserve/model/default" \
    && if /opt/cellserve/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---- runtime -----------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="cellserve" \
      org.opencontainers.image.description="Stateful LSTM serving: gRPC streaming sessions whose state stays on the device" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.cellserve.variant="${VARIANT}"

# A fixed non-root uid/gid so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 cellserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cellserve

COPY --from=venv /opt/cellserve /opt/cellserve
COPY --from=venv /models /models

# Read-only-root friendly: nothing is written at run time except under /tmp (declared a volume; compose
# and Kubernetes mount a tmpfs/emptyDir there). No .pyc writes, logs go to stderr. The user has no home
# (/nonexistent), and CuPy writes its kernel cache to ~/.cupy/kernel_cache by default: point it at /tmp.
ENV PATH=/opt/cellserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/tmp/cupy-kernel-cache \
    CELLSERVE_HOST="[::]" \
    CELLSERVE_PORT=50051 \
    CELLSERVE_METRICS_PORT=9090 \
    CELLSERVE_MODEL_DIRS='["/models/default"]'
VOLUME ["/tmp"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090

# grpc.health.v1 on the overall service "": exit 0 only when SERVING (NOT_SERVING while warming/draining).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["cellserve", "health", "--server", "localhost:50051"]

# Exec form: the server is PID 1 and gets SIGTERM itself (health flips, sessions drain, then exit).
ENTRYPOINT ["cellserve", "serve"]
