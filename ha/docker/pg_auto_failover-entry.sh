#!/bin/sh
# Creates the node on first start (pg_autoctl create is idempotent on an existing PGDATA),
# applies the failover tuning of docs/high-availability.md, then runs the keeper (or the
# monitor): exec, so pg_autoctl is PID 1 and gets SIGTERM.
#   pg_auto_failover-entry monitor
#   pg_auto_failover-entry node NAME
set -eu
: "${PGAF_AUTH:=trust}"
case "${1:?monitor or node}" in
monitor)
    pg_autoctl create monitor --pgdata "$PGDATA" --hostname "$(hostname)" \
        --auth "$PGAF_AUTH" --ssl-self-signed
    # The monitor's decisions (ha/cluster.py MONITOR_SETTINGS): a failover in under 10 s.
    cat > "$PGDATA/failover-tuning.conf" <<'CONF'
pgautofailover.health_check_period = 1000
pgautofailover.health_check_timeout = 500
pgautofailover.health_check_max_retries = 1
pgautofailover.health_check_retry_delay = 250
pgautofailover.node_considered_unhealthy_timeout = 2000
pgautofailover.primary_demote_timeout = 5000
CONF
    grep -q "failover-tuning.conf" "$PGDATA/postgresql.conf" \
        || echo "include_if_exists = 'failover-tuning.conf'" >> "$PGDATA/postgresql.conf"
    ;;
node)
    pg_autoctl create postgres --pgdata "$PGDATA" --hostname "$(hostname)" \
        --name "${2:?node name}" --dbname twofactor --auth "$PGAF_AUTH" --ssl-self-signed \
        --pg-hba-lan --monitor "${PG_AUTOCTL_MONITOR:?}"
    # A primary cut off from the monitor and its standby stops itself before the monitor
    # lets the standby take writes (ha/cluster.py KEEPER_SETTINGS and NODE_SETTINGS): it
    # sees its standby gone after wal_sender_timeout, then waits network_partition_timeout.
    pg_autoctl config set --pgdata "$PGDATA" timeout.network_partition_timeout 2
    grep -q "^wal_sender_timeout" "$PGDATA/postgresql.conf" \
        || echo "wal_sender_timeout = '3s'" >> "$PGDATA/postgresql.conf"
    ;;
*)
    echo "usage: pg_auto_failover-entry monitor | node NAME" >&2
    exit 2
    ;;
esac
exec pg_autoctl run --pgdata "$PGDATA"
