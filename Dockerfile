# syntax=docker/dockerfile:1
# One image runs both programs: eptwatch-server (default entrypoint) and eptwatch-agent.
#   docker build -t eptwatch:0.1.0 .
# The base is pinned to an exact Python and Debian release; a release pipeline should also pin it
# by digest (FROM python:3.11.7-slim-bookworm@sha256:...) once it has resolved one it trusts.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A C compiler for the optional extensions (agent/sources/_smapscan.c, server/ingest/_reportscan.c); the final stage needs none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY agent ./agent
COPY server ./server
COPY common ./common
COPY proto ./proto
# Wheels for eptwatch and every dependency, so the final stage installs offline and has no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="eptwatch" \
      org.opencontainers.image.description="Fleet telemetry for lost EPT/NPT huge mappings on KVM hosts"
RUN useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin eptwatch
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels eptwatch && rm -rf /wheels
# The aggregator runs unprivileged. The agent DaemonSet overrides this with uid 0 and exactly the
# capabilities it needs to read other processes' smaps and debugfs (see helm/eptwatch/README.md).
USER 65532:65532
EXPOSE 9861 9862
ENTRYPOINT ["eptwatch-server"]
