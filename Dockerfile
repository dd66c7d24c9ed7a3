# syntax=docker/dockerfile:1
#
# cellserve serving image. Three variants from one file, picked by build arguments:
#
#   GPU (default): docker build -t cellserve:0.1.0-gpu .
#     runtime on NVIDIA's CUDA 13 + cuDNN 9 runtime image (onnxruntime-gpu 1.31.1's PyPI wheel links
#     libcudart.so.13 / libcublas.so.13), the `gpu` extra only.
#   GPU, CUDA from PyPI: docker build --build-arg CUDA_LIBS=wheels -t cellserve:0.1.0-gpu .
#     runtime on PYTHON_IMAGE; the CUDA runtime, cuBLAS and cuDNN come from the NVIDIA wheels that
#     onnxruntime-gpu names in its `cuda` and `cudnn` extras (onnxruntime-gpu[cuda,cudnn]).
#   CPU:           docker build --build-arg VARIANT=cpu -t cellserve:0.1.0-cpu .
#     runtime on PYTHON_IMAGE, the `serve` extra.
# Every variant also installs the `otel` extra (OpenTelemetry SDK and OTLP exporters): tracing stays off until the
# OTEL_* variables or the otlp_* settings switch it on (README "Observability: traces"), and then it can export.
#
# PYTHON_IMAGE may be any Debian or Ubuntu image with python3 (3.11+) and python3-venv: every pip runs
# from a venv of its own (no root pip, PEP 668 respected). deploy/image/build.sh builds both images on a
# Debian bookworm base made with debootstrap, with no container registry (deploy/README.md).
#
# Neither runtime stage has torch, a compiler, pip, or pip caches. The shipped model lives at
# /models/default (CELLSERVE_MODEL_DIRS points there); mount another model directory over it, or mount
# models elsewhere and set CELLSERVE_MODEL_DIRS='["/models/a","/models/b"]'. See deploy/README.md.

ARG VARIANT=gpu
ARG CUDA_LIBS=image
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: the wheel (pure Python; generated stubs and the shipped model are package data) -------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY model ./model
COPY client ./client
RUN /opt/build/bin/python -m build --wheel --outdir /wheels . \
    && /opt/build/bin/python -c "import sys, zipfile, glob; n = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); \
sys.exit(0 if 'cellserve/model/default/manifest.json' in n else 'wheel lacks the shipped model (cellserve/model/default)')"

# ---- runtime bases: the interpreter (and for GPU the CUDA libraries) ---------------------------------
FROM ${CUDA_IMAGE} AS base-gpu-image
ENV SERVING_EXTRA=gpu \
    CELLSERVE_DEVICE=cuda
# Ubuntu 24.04's Python 3.12 with venv support; no pip, no compilers, no docs. Package versions follow the
# pinned base image's Ubuntu release (pinning apt versions breaks as soon as the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The CUDA libraries are Python packages here (installed into the venv with the `gpu` extra):
# onnxruntime-gpu[cuda,cudnn] = nvidia-cuda-runtime, -cuda-nvrtc, -cufft, -curand, nvidia-cudnn-cu13 (which
# brings nvidia-cublas). onnxruntime.preload_dlls() and CuPy (cuda-pathfinder) find them in site-packages.
FROM ${PYTHON_IMAGE} AS base-gpu-wheels
ENV SERVING_EXTRA=gpu \
    CUDA_WHEELS=cuda,cudnn \
    CELLSERVE_DEVICE=cuda

# hadolint ignore=DL3006
FROM base-gpu-${CUDA_LIBS} AS base-gpu

FROM ${PYTHON_IMAGE} AS base-cpu
ENV SERVING_EXTRA=serve \
    CELLSERVE_DEVICE=cpu

# ---- deps: the extras' third-party packages, in a venv without pip --------------------------------
# Read from pyproject.toml, not from the wheel, so this (large) layer is rebuilt only when pyproject.toml
# changes, not with every code change. pip runs from its own venv (/opt/pip) with --python. The variant's
# serving extra plus TRACING_EXTRA (`otel`).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS deps
ENV TRACING_EXTRA=otel
COPY pyproject.toml /src/pyproject.toml
RUN python3 -m venv /opt/pip \
    && python3 -m venv --without-pip /opt/cellserve \
    && python3 -c 'import os, re, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
extras = os.environ.get("CUDA_WHEELS"); opt = p["optional-dependencies"]; \
reqs = p["dependencies"] + opt[os.environ["SERVING_EXTRA"]] + opt[os.environ["TRACING_EXTRA"]]; \
print("\n".join(re.sub(r"^onnxruntime-gpu\b", f"onnxruntime-gpu[{extras}]", r) if extras else r for r in reqs))' \
       > /src/requirements.txt \
    && /opt/pip/bin/pip --python /opt/cellserve/bin/python install --no-cache-dir -r /src/requirements.txt \
    && if /opt/cellserve/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---- app: the cellserve wheel without deps, staged under /stage at its runtime paths --------------
# The model moves to /models/default (the package's cellserve/model/default becomes a symlink to it).
FROM deps AS app
COPY --from=builder /wheels /wheels
RUN /opt/pip/bin/pip --python /opt/cellserve/bin/python install --no-cache-dir --no-deps /wheels/cellserve-*.whl \
    && /opt/pip/bin/pip --python /opt/cellserve/bin/python check \
    && site="$(/opt/cellserve/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p /stage/models "/stage${site}" /stage/opt/cellserve/bin \
    && mv "${site}/cellserve/model/default" /stage/models/default \
    && ln -s /models/default "${site}/cellserve/model/default" \
    && mv "${site}/cellserve" "${site}"/cellserve-*.dist-info "/stage${site}/" \
    && mv /opt/cellserve/bin/cellserve /stage/opt/cellserve/bin/

# ---- runtime -----------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
# A fixed non-root uid/gid so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 cellserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin cellserve

# Two layers: the dependencies (large, cached while pyproject.toml is unchanged), then cellserve and its model.
COPY --from=deps /opt/cellserve /opt/cellserve
COPY --from=app /stage/ /

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

# Last: the revision changes with every commit, and every step after an ARG that is used misses the layer
# cache (the 3 GB dependency layer of the GPU image among them, were it below).
ARG VARIANT
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="cellserve" \
      org.opencontainers.image.description="Stateful LSTM serving: gRPC streaming sessions whose state stays on the device" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.cellserve.variant="${VARIANT}"
