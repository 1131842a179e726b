# TwoFactorService: `twofactor serve` on 0.0.0.0:50051 (gRPC), 0.0.0.0:8080 (the web console,
# docs/console.md) and 0.0.0.0:9464 (Prometheus).
# Needs TWOFACTOR_DATABASE_URL and TWOFACTOR_ENCRYPTION_KEYS (or _FILE); see docker-compose.yml
# and docs/operations.md. The build context is whitelisted in .dockerignore.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The generated client first: the service depends on the `twofactor-client` distribution by
# name, and it changes less often than the service (a cached layer).
COPY clients/python/ /app/clients/python/
RUN pip install /app/clients/python

COPY pyproject.toml /app/
COPY service/ /app/service/
RUN pip install /app

# No root at run time; no home, no shell.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin twofactor
USER 10001

ENV TWOFACTOR_LISTEN_ADDRESS=0.0.0.0:50051 \
    TWOFACTOR_CONSOLE_ADDRESS=0.0.0.0:8080 \
    TWOFACTOR_METRICS_ADDRESS=0.0.0.0:9464
EXPOSE 50051 8080 9464

# Exec form: `twofactor` is PID 1 and gets SIGTERM itself; it stops taking calls, lets running
# ones finish (10 s grace) and closes the pool.
STOPSIGNAL SIGTERM
ENTRYPOINT ["twofactor"]
CMD ["serve"]
