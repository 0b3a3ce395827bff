# syntax=docker/dockerfile:1
# llm-proxy: multi-stage build on a slim, pinned Python base; the final image has no build tools,
# no pip cache, and runs as a fixed non-root user that owns only /app/data.
# One image for every backend: SQLite by default, PostgreSQL and Redis when DATABASE_URL and REDIS_URL
# name them (the postgres and redis extras are installed; deploy/compose.yaml runs two gateways so).
#
#   docker build -t llm-proxy .
#   docker run --read-only --tmpfs /tmp -v llm-proxy-data:/app/data --env-file .env \
#     --cap-drop ALL --security-opt no-new-privileges --memory 512m --cpus 1 --pids-limit 256 \
#     -p 8080:8080 llm-proxy

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY llm_proxy ./llm_proxy
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile ".[fast,postgres,redis]" \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.11-slim-bookworm
ARG APP_UID=10001
ARG APP_GID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LISTEN_ADDR=:8080 \
    DATABASE_PATH=/app/data/llm-proxy.db \
    AUDIT_LOG_FILE=/app/data/audit.log
RUN groupadd --system --gid ${APP_GID} appuser \
 && useradd --system --uid ${APP_UID} --gid ${APP_GID} --home-dir /app --no-create-home --shell /usr/sbin/nologin appuser \
 && mkdir -p /app/data && chown appuser:appuser /app/data && chmod 0750 /app/data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER appuser:appuser
VOLUME ["/app/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-proxy"]
CMD ["serve"]
