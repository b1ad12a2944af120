# syntax=docker/dockerfile:1
#
# mhr: migrant health records.
#
#   docker build -t mhr .
#   docker run --rm -v mhr-var:/app/var mhr mhr keys init     # once: creates the keyring
#   docker run -p 8000:8000 -v mhr-var:/app/var \
#     -e MHR_PUBLIC_BASE_URL=https://mhr.example.org \
#     -e MHR_DEPLOYMENT_NAME=mhr.example.org/prod \
#     -e MHR_DATABASE_URL=postgresql+asyncpg://mhr:...@db/mhr \
#     mhr
#
# MHR_ENV is production: without an https public base URL and a deployment
# name the service refuses to start and says what to set. `mhr serve` applies
# the database migrations before it serves. The keyring lives in /app/var,
# created once by `mhr keys init` (the service never creates one outside
# development, and refuses to start with a keyring other than the one the
# database's data was written under): keep that volume, and back it up apart
# from the database, or use an HSM.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a virtual environment with the project and its dependencies ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The runtime dependencies, the build backend and pip, pinned with hashes (`make lock`).
COPY requirements-runtime.lock ./
RUN pip install --require-hashes -r requirements-runtime.lock

COPY pyproject.toml README.md ./
COPY service ./service
COPY security ./security
COPY migrations ./migrations
# The implementation guide is data read at run time: the wheel installs it under
# /opt/venv/share/mhr/fhir (pyproject's data-files), where settings.ig_dir finds
# it. It must never become a Python package.
COPY fhir ./fhir

# A regular (non-editable) install into the venv: the image needs no source tree.
RUN pip install --no-deps --no-build-isolation . \
 && cd / \
 && python -c "import migrations, security, service.core.settings as s; \
assert all(m.__file__.startswith('/opt/venv/') for m in (migrations, security, s)); \
assert (s.default_ig_dir() / 'CapabilityStatement-mhr.json').is_file(), s.default_ig_dir()"

# --- runtime: no compilers, no pip cache, not root ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MHR_ENV=production \
    MHR_PORT=8000

RUN groupadd --system --gid 10001 mhr \
 && useradd --system --uid 10001 --gid mhr --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin mhr

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Code stays root-owned and read-only to the service; only var/ (keyring, and a
# SQLite database for a single-node trial) is the service's, mode 0700.
RUN install -d -o mhr -g mhr -m 0700 /app/var
VOLUME ["/app/var"]

USER mhr
EXPOSE 8000

# python:slim has no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('MHR_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

CMD ["mhr", "serve", "--host", "0.0.0.0"]
