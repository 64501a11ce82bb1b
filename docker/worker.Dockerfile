# GPU worker image: `vitbatch worker` (Celery, solo pool) with torch, transformers and timm.
#
# One container = one worker process = one GPU. Run as many containers as the host has GPUs,
# each pinned to its own device (see docker/compose.yaml and docs/deployment.md): the solo pool
# runs one shard at a time in the main process, because CUDA does not survive fork and
# prefork children are daemonic, so they cannot own the decode process pool.
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t vitbatch-worker:0.1.0 .
# Needs an NVIDIA driver that supports CUDA 13.0 (R580 or newer) and the NVIDIA Container Toolkit.
# Nothing secret is baked in: broker URL, S3 credentials and Flower passwords come from the
# environment at run time.

# torch 2.14.1+cu130 with cuDNN 9: the same torch build that pyproject's `torch==2.14.1` pin
# takes from PyPI, so the pip install below keeps the base's torch instead of fetching 2 GB again.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITBATCH_MODEL_CACHE_DIR=/cache/models \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    WORKER_NAME=vitbatch

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vitbatch \
    && mkdir -p /cache \
    && chown vitbatch:vitbatch /cache

WORKDIR /opt/vitbatch
COPY pyproject.toml ./
COPY orchestrator/ orchestrator/
COPY workers/ workers/

# Versions come from pyproject's exact pins (`==`); "./[worker]" is this checkout with its
# worker extra. pip keeps the base's torch (2.14.1+cu130 satisfies ==2.14.1); the check fails
# the build if it ever replaced it with another build.
RUN pip install --no-cache-dir "./[worker]" \
    && python -c "import torch, timm, transformers, workers; assert torch.__version__.startswith('2.14.1'), torch.__version__; assert torch.version.cuda == '13.0', torch.version.cuda"

USER 10001:10001
VOLUME ["/cache"]

# The threads pool answers pings while shards run (solo answers only between shards, so a
# ping can go unanswered for as long as a shard runs). Unhealthy means "no reply for
# longer than a shard may take": 35 misses x 2 min = 70 min > VITBATCH_VISIBILITY_TIMEOUT_S
# (4000 s by default). WORKER_NAME must match --name below; Celery appends the hostname.
HEALTHCHECK --interval=2m --timeout=45s --start-period=5m --retries=35 \
    CMD ["/bin/sh", "-c", "celery -A workers inspect ping --timeout 30 --destination \"${WORKER_NAME}@${HOSTNAME}\" || exit 1"]

# `vitbatch worker` execs Celery in place, so Celery receives SIGTERM and shuts down warm:
# it finishes the running shard, then exits. Give the container a stop grace period longer
# than a shard takes.
ENTRYPOINT ["vitbatch", "worker"]
CMD ["--queues", "vitbatch-interactive,vitbatch", "--shards-in-flight", "2", "--name", "vitbatch"]
