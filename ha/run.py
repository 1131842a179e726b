"""`make run-ha`: the cluster of `make test-ha` (a pg_auto_failover monitor, a primary and its
synchronous standby) and two TwoFactorService replicas on the multi-host URL, on this machine,
to try out; the addresses are printed. Ctrl-C (or SIGTERM) stops everything, by PID, and
removes the cluster's directory: nothing is kept between runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from ha.cluster import free_port, running_cluster
from ha.service import start_replica, stop_replica, wait_serving
from twofactor_service.encryption import new_key_line

# The replicas' gRPC and web console ports when free (else any free port): next to `make run`'s
# 50051 and 8080.
PREFERRED_PORTS = (50061, 50062)
PREFERRED_CONSOLE_PORTS = (8081, 8082)


def _port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


async def serve(base: Path) -> None:
    keys = os.environ.get("TWOFACTOR_ENCRYPTION_KEYS") or new_key_line("ha1")
    async with running_cluster(base) as cluster:
        url = cluster.database_url
        consoles = [f"127.0.0.1:{_port(port)}" for port in PREFERRED_CONSOLE_PORTS]
        replicas = [
            start_replica(
                name, base / "logs", url, keys, f"127.0.0.1:{_port(port)}", console_address=console
            )
            for name, port, console in zip(("a", "b"), PREFERRED_PORTS, consoles, strict=True)
        ]
        try:
            await asyncio.gather(*(wait_serving(r) for r in replicas))
            env_file = base / "service.env"
            env_file.write_text(f"TWOFACTOR_DATABASE_URL={url}\nTWOFACTOR_ENCRYPTION_KEYS={keys}\n")
            env_file.chmod(0o600)
            wrapper = cluster.write_pg_autoctl_wrapper()
            primary = await cluster.primary()
            standby = next(n for n in cluster.nodes if n is not primary)
            addresses = ",".join(r.address for r in replicas)
            print(
                "\nTwoFactorService on a highly available PostgreSQL (Ctrl-C stops everything):\n"
                + "".join(
                    f"  replica {r.name}            {r.address} (web console http://{console}/)\n"
                    for r, console in zip(replicas, consoles, strict=True)
                )
                + f"  client target        ipv4:{addresses} with round_robin"
                " (docs/high-availability.md)\n"
                f"  PostgreSQL primary   127.0.0.1:{primary.port if primary else '?'}"
                f" ({primary.name if primary else '?'}), synchronous standby"
                f" 127.0.0.1:{standby.port} ({standby.name})\n"
                f"  monitor              {cluster.monitor_uri}\n"
                f"  service database URL {url}\n"
                f"  logs                 {base / 'logs'}\n"
                "In another terminal:\n"
                f"  set -a; . {env_file}; set +a   # the replicas' database URL and key\n"
                "  .venv/bin/twofactor create-user admin --password 'choose-a-long-one' --admin\n"
                f"  {wrapper} show state --pgdata {cluster.monitor.pgdata}\n"
                f"  {wrapper} perform failover --pgdata {standby.pgdata}   # a planned failover\n",
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            while not stop.is_set():
                for replica in replicas:
                    if replica.process.poll() is not None:
                        print(f"replica {replica.name} exited; see {replica.log}", flush=True)
                        stop.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            print("stopping the replicas and the cluster", flush=True)
        finally:
            for replica in replicas:
                await asyncio.to_thread(stop_replica, replica)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="twofactor-run-ha-"))
    try:
        asyncio.run(serve(base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
