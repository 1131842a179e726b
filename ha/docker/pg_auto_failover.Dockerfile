# A pg_auto_failover node (monitor or PostgreSQL data node) from Debian's own packages:
# postgresql-15-auto-failover brings pg_autoctl, PostgreSQL 15 and the monitor extension.
# Used by docker-compose.ha.yml; the command (create monitor / create postgres) is given there.
# The build context is ha/docker/, which holds nothing but this file and the entry script.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql-15-auto-failover ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --chmod=0755 pg_auto_failover-entry.sh /usr/local/bin/pg_auto_failover-entry

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/pgaf \
    XDG_CONFIG_HOME=/var/lib/postgresql/pgaf-config \
    XDG_DATA_HOME=/var/lib/postgresql/pgaf-state

# pg_autoctl refuses to run as root.
USER postgres
WORKDIR /var/lib/postgresql
EXPOSE 5432
STOPSIGNAL SIGTERM
ENTRYPOINT ["pg_auto_failover-entry"]
