# One image for the whole process group: pipeline-supervise runs supervisord in the foreground
# (as PID 1) with the project's supervisord.conf, the same file `make run`, bin/pipeline and the
# tests run. Two ways to run it (README):
#   - alone: no MYSQL_*_URL, so a MariaDB of its own runs inside the container, its data on the
#     volume (EMBEDDED_MARIADB_DIR), started before the programs and stopped after them;
#   - against existing servers: MYSQL_PIPELINE_URL and MYSQL_SHARD_<N>_URL (docker-compose.yml).
# The API listens on every interface of the container (PIPELINE_API_HOST) behind a token
# generated at first start into the volume (PIPELINE_API_TOKEN_FILE) unless one is given.
FROM python:3.11-slim

# Debian's MariaDB server, for the embedded database. Versions are Debian stable's: pinning one
# would break the build as soon as the archive moves on to its next security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends mariadb-server \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A regular (non-editable) install: what runs is the package, its SQL files and supervisord.conf
# included as package data; the sources are removed afterwards.
WORKDIR /src
COPY pyproject.toml README.md supervisord.conf ./
COPY app ./app
COPY monitor ./monitor
COPY db ./db
RUN pip install . \
 && rm -rf /src

# /app holds the config the container runs and its run folder (socket, pid file, supervisord's
# log); /var/lib/pipeline is the volume: the shared folder, the embedded database, the token.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /app pipeline \
 && mkdir -p /app/var/run /var/lib/pipeline \
 && chown -R 10001:10001 /app/var /var/lib/pipeline \
 && chmod 0700 /app/var/run
COPY supervisord.conf /app/supervisord.conf
WORKDIR /app

USER 10001
# PIPELINE_API_TOKEN_FILE names the file that keeps the token, it holds no secret itself.
# hadolint ignore=DL3064
ENV SHARED_DIR=/var/lib/pipeline/shared \
    EMBEDDED_MARIADB_DIR=/var/lib/pipeline/mariadb \
    PIPELINE_API_TOKEN_FILE=/var/lib/pipeline/api-token \
    PIPELINE_API_HOST=0.0.0.0 \
    PIPELINE_API_PORT=8082 \
    SUPERVISOR_SOCKET=/app/var/run/supervisor.sock \
    PIPELINE_EXIT_ON_FATAL=1
VOLUME ["/var/lib/pipeline"]
EXPOSE 8082

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/pipeline/health' % os.environ.get('PIPELINE_API_PORT', '8082'), timeout=4)"]

# SIGTERM stops every program gracefully (the API last), then the embedded MariaDB; a program
# gone FATAL, or the embedded MariaDB dying, ends the container with status 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeline-supervise", "-c", "/app/supervisord.conf"]
