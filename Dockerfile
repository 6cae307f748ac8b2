# syntax=docker/dockerfile:1.7
# InstColor Service image: one image for the API (`serve`), the GPU worker (`worker`) and the
# single-process CPU/GPU server (`serve` with COLORIZE_QUEUE=memory).
#
#   docker build -t instcolor-service .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<X.Y>-cudnn9-runtime .
#
# Weights are not baked in: mount them at /weights (see docs, "Checkpoints"). The entrypoint can
# fetch them into an empty volume when COLORIZE_FETCH_WEIGHTS=auto and the network allows.

# The official PyTorch runtime image: CUDA + cuDNN runtime libraries, torch and torchvision built
# for that CUDA, Python >= 3.11. Any tag with torch >= 2.4 works; the build fails early otherwise.
# For a small CPU-only image: --build-arg BASE_IMAGE=python:3.11-slim (docker-compose.cpu.yml).
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# 1. Dependencies, in their own layer keyed only on pyproject.toml: editing the source does not
#    reinstall them. Only the serving set ([project].dependencies, plus IMAGE_EXTRAS): the image
#    runs serve, worker, colorize and fetch-weights; the eval and train extras are left out.
#    torch/torchvision come from the base image and are pinned by constraints.txt so pip never
#    swaps them for another CUDA build (deploy/requirements_from_pyproject.py).
#    A base without torch (python:3.11-slim, for the CPU-only image) gets the CPU wheels first.
#    IMAGE_EXTRAS: extras installed too; tracing (the OpenTelemetry SDK and OTLP exporter, a few
#    MB, imported only when OTEL_* variables turn tracing on: docs/tracing.md). Empty: none.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG IMAGE_EXTRAS=tracing
COPY pyproject.toml deploy/requirements_from_pyproject.py /tmp/deps/
RUN --mount=type=cache,target=/root/.cache/pip \
    (python -c "import torch, torchvision" 2>/dev/null \
     || pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4" "torchvision>=0.19") \
    && python /tmp/deps/requirements_from_pyproject.py /tmp/deps/pyproject.toml --out /tmp/deps \
       --extras "${IMAGE_EXTRAS}" \
    && pip install -r /tmp/deps/requirements.txt -c /tmp/deps/constraints.txt \
    && python -c "import torch, torchvision, fastapi, uvicorn, redis, prometheus_client" \
    && rm -rf /tmp/deps

# 2. An unprivileged user with a writable home (library caches), and the weights mount point it
#    owns (a new named volume mounted there takes this ownership, so `fetch-weights` can write).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /weights \
    && chown app:app /weights

# 3. The source, last, owned by root and read-only to the service. --no-deps: everything was
#    installed in step 1. evaluation/ and training/ stay out, like their extras.
COPY pyproject.toml ./
COPY models ./models
COPY service ./service
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/instcolor-entrypoint
COPY --chmod=0644 deploy/healthcheck.py /usr/local/bin/instcolor-healthcheck
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && rm -rf build ./*.egg-info

USER app

ENV COLORIZE_HOST=0.0.0.0 \
    COLORIZE_PORT=8000 \
    COLORIZE_CHECKPOINTS=/weights/checkpoints \
    COLORIZE_DETECTOR_WEIGHTS=/weights/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth \
    COLORIZE_WEIGHTS_DIR=/weights \
    COLORIZE_FETCH_WEIGHTS=never

VOLUME ["/weights"]
EXPOSE 8000

# Ready means weights verified and warm-up done. A generous start period covers model loading
# and warm-up; the worker overrides the URL (its own port) in docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/instcolor-healthcheck"]

ENTRYPOINT ["/usr/local/bin/instcolor-entrypoint"]
CMD ["serve"]
