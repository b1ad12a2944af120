# syntax=docker/dockerfile:1
#
# mhr: migrant health records.
#
#   docker build -t mhr .
#   docker run -p 8000:8000 -v mhr-var:/app/var \
#     -e MHR_PUBLIC_BASE_URL=https://mhr.example.org \
#     -e MHR_DEPLOYMENT_NAME=mhr.example.org/prod \
#     -e MHR_DATABASE_URL=postgresql+asyncpg://mhr:...@db/mhr \
#     mhr
#
# MHR_ENV is production: without an https public base URL and a deployment
# name the service refuses to start and says what to set. `mhr serve` applies
# the database migrations before it serves. The keyring (created 0600 on first
# start) lives in /app/var: keep that volume, and back it up apart from the
# database, or use an HSM.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a virtual environment with the project and its dependencies ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY security ./security
COPY migrations ./migrations
# The implementation guide is data read at run time (settings.ig_dir defaults to
# the fhir/ directory next to service/); it must never become a Python package.
COPY fhir ./fhir

# Installed in place (editable) so that the code stays in /app beside fhir/,
# exactly as in the repository; the runtime stage copies /app to the same path.
RUN pip install --upgrade pip \
 && pip install -e . \
 && python -m compileall -q service security migrations \
 && cd / \
 && python -c "import migrations, security, service.settings as s; \
assert all(m.__file__.startswith('/app/') for m in (migrations, security, s)); \
assert (s.PROJECT_ROOT / 'fhir' / 'CapabilityStatement-mhr.json').is_file()"

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
COPY --from=builder /app /app

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
