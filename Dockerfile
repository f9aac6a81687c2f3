# One image for the whole process group: supervisord (in the foreground, as PID 1) runs
# pipeline-apid, event-ingest, shard-splitter and, per shard, shard-worker-<N> and
# mysql-sender-<N>, from the same supervisord.conf.template that bin/pipeline and the tests use.
# Point it at MySQL servers with MYSQL_PIPELINE_URL and MYSQL_SHARD_<N>_URL (see docs/operations.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md supervisord.conf.template ./
COPY app ./app
COPY monitor ./monitor
COPY db ./db
COPY bin ./bin

RUN pip install -e . \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /app pipeline \
 && mkdir -p /shared /app/var/run \
 && chown pipeline:pipeline /shared /app/var/run

USER pipeline
# VENV: where bin/pipeline finds python, so `bin/pipeline ctl status` works in the container too.
ENV VENV=/usr/local \
    SHARED_DIR=/shared \
    PIPELINE_RUN_DIR=/app/var/run \
    PIPELINE_API_HOST=0.0.0.0 \
    PIPELINE_API_PORT=8082 \
    PIPELINE_EXIT_ON_FATAL=1
VOLUME ["/shared"]
EXPOSE 8082

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/pipeline/health' % os.environ.get('PIPELINE_API_PORT', '8082'), timeout=4)"

# supervisord's main loop runs in this process (app/supervision/supervise.py renders the config for
# SHARD_COUNT first): SIGTERM stops every program gracefully; a FATAL program exits 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app.supervision.supervise"]
