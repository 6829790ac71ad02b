# syntax=docker/dockerfile:1
# convai-gateway container image.
#   docker build -t convai-gateway .
#   docker run --rm -p 8080:8080 --env-file gateway.env convai-gateway
# Pin the base by digest in your registry mirror for fully reproducible builds
# (python:3.11.14-slim-bookworm@sha256:...); the tag below is the minimum pin.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: build the project wheel and a self-contained virtualenv -----------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel needs: a change to tests or docs does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY service ./service

# The venv lives at the same path in both stages, so its interpreter links stay valid.
# All runtime deps (uvloop, httptools, hiredis, cryptography, aiohttp) ship manylinux wheels,
# so no compiler is needed here either. Importing the app makes a dependency missing from
# pyproject.toml fail the build rather than the first request.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/convai_gateway-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -c "import service.app, service.emulator, service.healthcheck" \
    && /opt/venv/bin/convai-gateway --help >/dev/null

# ---- runtime: interpreter + venv only, no build tools, non-root -----------------------
# (pip and the setuptools venv seeds are uninstalled above: nothing at runtime needs them, scanners flag them.)
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="convai-gateway" \
      org.opencontainers.image.description="Backend-for-frontend for the ElevenLabs Conversational AI API" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image also installs pip, setuptools and wheel into the system interpreter (/usr/local):
# removed as well, so the image carries no installer and none of their versions for scanners to flag.
# A fixed numeric uid/gid so Kubernetes runAsNonRoot/runAsUser can verify it.
RUN python -m pip uninstall --yes --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
       pip setuptools wheel \
    && rm -f /usr/local/bin/pip \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

# HOST=0.0.0.0: inside a container the loopback default would be unreachable.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# No curl in the image: the interpreter does the probe, at the address HOST and PORT name (HOST=0.0.0.0 via
# 127.0.0.1, HOST=:: via ::1, which a fixed 127.0.0.1 missed); any non-2xx answer is unhealthy.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]

ENTRYPOINT ["convai-gateway"]
CMD ["serve"]
