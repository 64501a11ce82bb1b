# Control-plane image: `vitbatch submit/status/wait/cancel/retry/jobs`, Flower and beat.
#
# Installs vitbatch without the `worker` extra: no torch, no CUDA, a few hundred MB.
# Build from the repository root:
#   docker build -f docker/orchestrator.Dockerfile -t vitbatch-orchestrator:0.1.0 .
# Nothing secret is baked in; the broker URL, S3 credentials and Flower auth come from the
# environment at run time.

FROM python:3.11.17-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vitbatch

WORKDIR /opt/vitbatch
COPY pyproject.toml ./
COPY orchestrator/ orchestrator/
# setuptools lists both packages; `workers` installs but is only imported by `celery -A workers`.
COPY workers/ workers/

# Versions come from pyproject's exact pins (`==`). The check fails the build if the
# control plane ever starts pulling torch in.
RUN pip install --no-cache-dir . \
    && python -c "import sys, orchestrator.commands.cli; assert 'torch' not in sys.modules, 'orchestrator imported torch'"

USER 10001:10001

ENTRYPOINT ["vitbatch"]
CMD ["--help"]
