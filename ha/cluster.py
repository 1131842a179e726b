"""A pg_auto_failover formation on this machine: a monitor and two PostgreSQL data nodes with
synchronous replication, on local ports, for `make test-ha` and `make run-ha`.

Nothing here decides which node is the primary: the pg_auto_failover monitor does, and the
keepers (`pg_autoctl run`, one per node) carry it out. This module only installs the package,
creates the nodes, starts and stops the keepers, reads the monitor's view, and kills a node the
way a crashed machine dies.

pg_autoctl refuses to run as root, so as root (CI) every node runs as the `postgres` user
(created by the Debian PostgreSQL packages), switched to with `setpriv`, which execs: the PID we
hold is the keeper's own. Each keeper is started in a session of its own; the postmaster stays
in the keeper's process group (pg_autoctl does not setsid it), its backends set up their own.
Every process is stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

DATABASE = "twofactor"
# The failover manager's documented tuning (pg_auto_failover "Configuring pg_auto_failover"),
# chosen for a gap of at most 10 s from the primary's death or freeze to the first acknowledged
# write (the defaults take about a minute). The monitor checks every node every second, gives up
# on a health check after 0.5 s (a local network answers in milliseconds; one retry), acts on a
# node once its keeper has been silent for 2 s, and waits 5 s for a primary it cannot reach to
# stop itself before the standby takes writes. Why this is safe: docs/high-availability.md.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "500",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "250",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "5000",
}
# On the data nodes. A demoted primary that pg_rewind cannot bring back is rebuilt with
# pg_basebackup, which first waits for a spread checkpoint: paced over checkpoint_timeout
# (default 5 min), that is over a minute of rejoin on this machine; 30 s keeps it short.
# wal_sender_timeout: a primary cut off from its standby sees its replication connection gone
# (pg_stat_replication empty) after 3 s instead of 60 s; only then does its keeper count it
# as isolated (below).
NODE_SETTINGS = {"checkpoint_timeout": "30s", "wal_sender_timeout": "3s"}
# A primary that can reach neither the monitor nor its standby stops itself after this long
# (seconds): with the standby's replication gone after 3 s, the keeper stops PostgreSQL about
# 4-6 s after the cut, before the monitor lets the standby take writes (at least 2 s + 5 s
# after the keeper's last report). Synchronous replication guards the writes regardless: the
# standby stops streaming before it is promoted, so an isolated primary acknowledges nothing.
KEEPER_SETTINGS = {"timeout.network_partition_timeout": "2"}
# The freeze mode: how long every process of the primary's node stays stopped (SIGSTOP).
FREEZE_SECONDS = 25.0

# Every process this module stopped and has not resumed yet: resumed at exit whatever the way
# out (see `thaw_everything`), so a failed or interrupted run never leaves a node stopped.
_FROZEN: dict[int, float] = {}


def thaw_everything() -> None:
    """SIGCONT to every process `Cluster.freeze` stopped (idempotent, signal-safe enough: no
    lock, no allocation beyond a list)."""
    for pid in list(_FROZEN):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
        _FROZEN.pop(pid, None)


def _thaw_on_signal(signum: int, frame: object) -> None:
    thaw_everything()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_thaw_guards() -> None:
    """At exit, and on SIGTERM, SIGINT and SIGHUP, resume every stopped process first."""
    atexit.register(thaw_everything)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _thaw_on_signal)


RUN_AS_USER = "postgres"
PACKAGE = "postgresql-{major}-auto-failover"
STOP_WITHIN_SECONDS = 30.0


class ClusterError(RuntimeError):
    """The cluster could not be set up or did not reach the expected state; says why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _installed_bin_dir() -> Path | None:
    """The PostgreSQL bin directory of the newest major version with the pg_auto_failover
    extension installed, when `pg_autoctl` is there too."""
    if shutil.which("pg_autoctl") is None:
        return None
    majors = sorted(
        (
            int(extensions.parent.name)
            for extensions in Path("/usr/share/postgresql").glob("*/extension")
            if extensions.parent.name.isdigit() and (extensions / "pgautofailover.control").exists()
        ),
        reverse=True,
    )
    for major in majors:
        bin_dir = Path(f"/usr/lib/postgresql/{major}/bin")
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    return None


def ensure_installed(say: Callable[[str], None] = print) -> Path:
    """pg_auto_failover from the distribution (Debian/Ubuntu `postgresql-N-auto-failover`,
    which brings `pg_autoctl` and PostgreSQL N); installed with apt-get when running as root.
    Returns the PostgreSQL bin directory."""
    bin_dir = _installed_bin_dir()
    if bin_dir is not None:
        return bin_dir
    servers = sorted(
        (int(p.name) for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()),
        reverse=True,
    )
    package = PACKAGE.format(major=servers[0] if servers else 15)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterError(
            f"pg_auto_failover is not installed: install the package {package} (it brings "
            "pg_autoctl), e.g. `sudo apt-get install postgresql-15-auto-failover`, or run this "
            "as root on Debian/Ubuntu to have it installed"
        )
    say(f"installing {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    bin_dir = _installed_bin_dir()
    if bin_dir is None:
        raise ClusterError(f"{package} was installed but pg_autoctl or pg_ctl is still missing")
    return bin_dir


@dataclass
class Node:
    """One pg_autoctl-managed PostgreSQL: the monitor or a data node."""

    name: str
    pgdata: Path
    port: int
    log: Path
    keeper: subprocess.Popen[bytes] | None = None

    def postmaster_pid(self) -> int | None:
        """The running postmaster of this data directory, checked against its command line
        (a PID file can outlive its process, and PIDs are reused)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
            command = psutil.Process(pid).cmdline()
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        return pid if str(self.pgdata) in command else None


@dataclass(frozen=True)
class NodeState:
    """A data node as the monitor sees it."""

    name: str
    port: int
    reported: str
    assigned: str


@dataclass
class Cluster:
    """A monitor and two data nodes under `base`, run by `pg_autoctl` as an unprivileged user."""

    base: Path
    bin_dir: Path
    monitor: Node
    nodes: list[Node]
    run_as: list[str] = field(default_factory=list)

    @classmethod
    def prepare(cls, base: Path, bin_dir: Path, node_count: int = 2) -> Cluster:
        base.mkdir(parents=True, exist_ok=True)
        (base / "logs").mkdir(exist_ok=True)
        (base / "run").mkdir(exist_ok=True)
        run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(RUN_AS_USER)
            except KeyError:
                raise ClusterError(
                    f"no {RUN_AS_USER!r} user to run PostgreSQL as (pg_autoctl refuses root); "
                    "the postgresql-common package creates it"
                ) from None
            for path in (base, base / "run"):
                os.chown(path, user.pw_uid, user.pw_gid)
            run_as = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--init-groups",
                "--",
            ]
        base.chmod(0o755)

        def node(name: str) -> Node:
            return Node(name, base / name, free_port(), base / "logs" / f"{name}.log")

        return cls(
            base=base,
            bin_dir=bin_dir,
            monitor=node("monitor"),
            nodes=[node(f"node{i}") for i in range(1, node_count + 1)],
            run_as=run_as,
        )

    # --- running pg_autoctl

    def _env(self) -> dict[str, str]:
        sockets = str(self.base / "run")
        return {
            "HOME": str(self.base),
            "XDG_CONFIG_HOME": str(self.base / "config"),
            "XDG_DATA_HOME": str(self.base / "share"),
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            # Unix sockets in our own directory (pg_autoctl passes it to postgres as -k), so
            # nothing depends on /var/run/postgresql.
            "PG_REGRESS_SOCK_DIR": sockets,
            "PGHOST": sockets,
            # pg_autoctl's PID files (else under /tmp/pg_autoctl).
            "XDG_RUNTIME_DIR": sockets,
        }

    def _pg_autoctl(self, *args: str, log: Path) -> None:
        with log.open("ab") as sink:
            done = subprocess.run(  # noqa: S603 - pg_autoctl with arguments from this module
                [*self.run_as, "pg_autoctl", *args],
                env=self._env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                timeout=180,
                check=False,
            )
        if done.returncode != 0:
            raise ClusterError(
                f"pg_autoctl {args[0]} {args[1] if len(args) > 1 else ''} failed; "
                f"its log:\n{_tail(log)}"
            )

    def start(self, node: Node) -> None:
        """`pg_autoctl run` for the node (its keeper, which starts PostgreSQL)."""
        if node.keeper is not None and node.keeper.poll() is None:
            return
        with node.log.open("ab") as sink:
            node.keeper = subprocess.Popen(  # noqa: S603 - pg_autoctl, arguments from here
                [*self.run_as, "pg_autoctl", "run", "--pgdata", str(node.pgdata)],
                env=self._env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
            )

    def write_pg_autoctl_wrapper(self) -> Path:
        """`<base>/pg_autoctl`: pg_autoctl as the cluster's user with the cluster's environment,
        for an operator to try `show state` or `perform failover` by hand."""
        wrapper = self.base / "pg_autoctl"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self._env().items())
        prefix = " ".join(shlex.quote(a) for a in self.run_as)
        wrapper.write_text(f'#!/bin/sh\nexec {prefix} env {env} pg_autoctl "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover?sslmode=disable"

    @property
    def database_url(self) -> str:
        """The service's URL: every data node, the writable one wherever it is."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"

    def node_url(self, node: Node, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{node.port}/{database}"

    async def create(self, say: Callable[[str], None] = print) -> None:
        """The monitor (tuned), then the first node (primary), then the second (its
        synchronous standby); returns when the monitor reports primary + secondary."""
        started = time.monotonic()
        monitor = self.monitor

        async def pg_autoctl(node: Node, *args: str) -> None:
            await asyncio.to_thread(self._pg_autoctl, *args, log=node.log)

        await pg_autoctl(
            monitor,
            "create", "monitor", "--pgdata", str(monitor.pgdata), "--pgport", str(monitor.port),
            "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl",
            "--pgctl", str(self.bin_dir / "pg_ctl"),
        )  # fmt: skip
        await pg_autoctl(
            monitor,
            "config", "set", "--pgdata", str(monitor.pgdata),
            "postgresql.listen_addresses", "127.0.0.1",
        )  # fmt: skip
        self.start(monitor)
        await self._tune_monitor()
        say(f"  monitor on 127.0.0.1:{monitor.port} ({time.monotonic() - started:.0f} s)")
        for index, node in enumerate(self.nodes):
            await pg_autoctl(
                node,
                "create", "postgres", "--pgdata", str(node.pgdata), "--pgport", str(node.port),
                "--listen", "127.0.0.1", "--hostname", "127.0.0.1", "--name", node.name,
                "--dbname", DATABASE, "--auth", "trust", "--no-ssl",
                "--monitor", self.monitor_uri, "--pgctl", str(self.bin_dir / "pg_ctl"),
            )  # fmt: skip
            for key, value in KEEPER_SETTINGS.items():
                await pg_autoctl(node, "config", "set", "--pgdata", str(node.pgdata), key, value)
            self.start(node)
            wanted = {"single"} if index == 0 else {"primary", "secondary"}

            async def joined(wanted: set[str] = wanted, count: int = index + 1) -> bool:
                return await self._converged(count, wanted)

            await self.wait_until(joined, within=120, what=f"{node.name} joined the formation")
            if index == 0:
                # ALTER SYSTEM writes postgresql.auto.conf, which pg_basebackup copies to the
                # standbys made from this node.
                await self._alter_system(self.node_url(node), NODE_SETTINGS)
            say(f"  {node.name} on 127.0.0.1:{node.port} ({time.monotonic() - started:.0f} s)")

    async def _monitor_connection(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.node_url(self.monitor, "pg_auto_failover"), timeout=5
        )
        return conn

    async def _tune_monitor(self) -> None:
        await self._alter_system(self.node_url(self.monitor, "pg_auto_failover"), MONITOR_SETTINGS)

    async def _alter_system(self, url: str, settings: dict[str, str]) -> None:
        """ALTER SYSTEM and reload, once the server takes connections (its keeper may be
        (re)starting it)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = await asyncpg.connect(url, timeout=5)
                break
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            for name, value in settings.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    # --- what the monitor says

    async def states(self) -> list[NodeState]:
        conn = await self._monitor_connection()
        try:
            rows = await conn.fetch(
                "SELECT nodename, nodeport, reportedstate::text AS reported,"
                " goalstate::text AS assigned FROM pgautofailover.node ORDER BY nodeid"
            )
        finally:
            await conn.close()
        return [NodeState(r["nodename"], r["nodeport"], r["reported"], r["assigned"]) for r in rows]

    async def events(self, since: float = 0.0) -> list[tuple[float, str]]:
        """The monitor's event log since `since` (epoch seconds, description), oldest first."""
        conn = await self._monitor_connection()
        try:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM eventtime)::float8 AS at, description"
                " FROM pgautofailover.event WHERE eventtime >= to_timestamp($1)"
                " ORDER BY eventid",
                since,
            )
        finally:
            await conn.close()
        return [(r["at"], r["description"]) for r in rows]

    async def _converged(self, count: int, wanted: set[str]) -> bool:
        try:
            states = await self.states()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        return len(states) == count and all(
            s.reported == s.assigned and s.reported in wanted for s in states
        )

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    async def primary(self) -> Node | None:
        """The node the monitor has as writable primary, once it has converged there: with
        its synchronous standby ("primary") or, after a failover, still without ("wait_primary",
        until the old primary rejoins)."""
        try:
            states = await self.states()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        for state in states:
            if state.reported == state.assigned and state.reported in ("primary", "wait_primary"):
                return self.node_named(state.name)
        return None

    async def healthy(self) -> bool:
        """A primary and a synchronous standby, both converged."""
        return await self._converged(len(self.nodes), {"primary", "secondary"})

    async def wait_until(
        self, condition: Callable[[], Awaitable[bool]], *, within: float, what: str
    ) -> float:
        """Polls `condition` (every 0.2 s); returns the seconds it took, or fails naming `what`
        with the end of every log."""
        started = time.monotonic()
        while not await condition():
            for node in (self.monitor, *self.nodes):
                if node.keeper is not None and node.keeper.poll() not in (None, -signal.SIGKILL):
                    raise ClusterError(f"{node.name}'s pg_autoctl exited:\n{_tail(node.log)}")
            if time.monotonic() - started > within:
                logs = "\n".join(
                    f"--- {n.name}\n{_tail(n.log)}" for n in (self.monitor, *self.nodes)
                )
                raise ClusterError(f"not within {within:.0f} s: {what}\n{logs}")
            await asyncio.sleep(0.2)
        return time.monotonic() - started

    # --- failures and shutdown

    def kill(self, node: Node) -> None:
        """The node dies as with its machine: SIGKILL to its keeper (pg_autoctl and its
        sub-processes: one process group) and to its postmaster and every backend.

        Killing the postmaster alone is no failover: the keeper restarts it within a second
        (`timeout.postgresql_restart_failure_*`), and the monitor never sees the node as
        unhealthy. Killing the keeper alone leaves PostgreSQL serving as primary."""
        postmaster = node.postmaster_pid()
        victims: list[psutil.Process] = []
        if postmaster is not None:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(postmaster)
                victims = [parent, *parent.children(recursive=True)]
        if node.keeper is not None and node.keeper.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.keeper.pid, signal.SIGKILL)
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        if node.keeper is not None:
            node.keeper.wait(timeout=10)
        psutil.wait_procs(victims, timeout=10)

    def freeze(self, node: Node) -> list[int]:
        """The node stops as a paused VM does: SIGSTOP to its keeper's process group (pg_autoctl
        and its sub-processes, and the postmaster, which stays in that group) and then to every
        backend (each in a process group of its own). Nothing is closed: the kernel still
        accepts connections and acknowledges TCP data, nobody answers. Returns the PIDs, which
        `thaw` resumes (and `thaw_everything` at any exit)."""
        stopped: list[int] = []
        if node.keeper is not None and node.keeper.poll() is None:
            group = os.getpgid(node.keeper.pid)
            members = [p.pid for p in psutil.process_iter() if _group_of(p.pid) == group]
            for pid in members:
                _FROZEN[pid] = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGSTOP)
            stopped += members
        postmaster = node.postmaster_pid()
        if postmaster is not None:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(postmaster)
                for process in [parent, *parent.children(recursive=True)]:
                    _FROZEN[process.pid] = time.monotonic()
                    with contextlib.suppress(psutil.Error):
                        process.send_signal(signal.SIGSTOP)
                    stopped.append(process.pid)
        return sorted(set(stopped))

    def thaw(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
            _FROZEN.pop(pid, None)

    def stop(self) -> None:
        """Every keeper gets SIGTERM (it stops PostgreSQL, fast mode); whatever still runs after
        STOP_WITHIN_SECONDS is killed. Data nodes first, the monitor last. A frozen node is
        resumed first (a stopped process does not act on SIGTERM)."""
        thaw_everything()
        for node in (*self.nodes, self.monitor):
            if node.keeper is not None and node.keeper.poll() is None:
                node.keeper.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN_SECONDS
        for node in (*self.nodes, self.monitor):
            if node.keeper is not None:
                try:
                    node.keeper.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.kill(node)
            if node.postmaster_pid() is not None:  # a postmaster its keeper left behind
                self.kill(node)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.asynccontextmanager
async def running_cluster(base: Path, say: Callable[[str], None] = print) -> AsyncIterator[Cluster]:
    """A created, healthy cluster under `base`, stopped (every process by PID) on exit."""
    bin_dir = ensure_installed(say)
    cluster = Cluster.prepare(base, bin_dir)
    try:
        await cluster.create(say)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)
