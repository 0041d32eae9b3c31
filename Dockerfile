# syntax=docker/dockerfile:1
# optiserve, CPU image: `docker build -t optiserve:0.1.0 .` then
# `docker run --rm -p 8000:8000 -p 8001:8001 optiserve:0.1.0` serves the example model in /models.
# The GPU image is docker/Dockerfile.gpu. See docs/deploy.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment with the project and its runtime dependencies only -------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# README* is optional: the glob lets the build pass with or without one.
COPY pyproject.toml README* ./
COPY server ./server
COPY optimizers ./optimizers
# A regular (non-editable) install without the test extra; the source tree is not copied further. The tracing
# extra (OpenTelemetry) is in: tracing stays off until OTEL_TRACES_EXPORTER or --tracing turns it on.
# pip byte-compiles while installing: keep the .pyc files, the root filesystem may be read-only at run time.
RUN pip install --no-cache-dir "./[tracing]"
# The example model is generated (same bytes on every run) rather than trusted from the build context.
COPY model_repo/make_example.py ./model_repo/make_example.py
RUN python model_repo/make_example.py

# ---- runtime: the venv, the example repository, a non-root user ----------------------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="optiserve" \
      org.opencontainers.image.description="ONNX model server speaking KServe V2 / Triton's protocol (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid ${UID} optiserve \
    && useradd --system --uid ${UID} --gid ${UID} --home-dir /home/optiserve --create-home \
       --shell /usr/sbin/nologin optiserve \
    && mkdir -p /var/cache/optiserve \
    && chown ${UID}:${UID} /var/cache/optiserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=${UID}:${UID} /src/model_repo/example /models/example
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPTISERVE_CACHE_DIR=/var/cache/optiserve
USER ${UID}:${UID}
WORKDIR /home/optiserve
EXPOSE 8000 8001
# Liveness of the HTTP listener; slim images have no curl, so Python's urllib asks. OPTISERVE_HTTP_PORT moves it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('OPTISERVE_HTTP_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["optiserve", "serve"]
CMD ["--model-repository", "/models", "--host", "0.0.0.0"]
