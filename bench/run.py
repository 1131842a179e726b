"""`make bench`: TwoFactorService's hot path measured against a bare gRPC server, in one run.

Phases (each: a fresh server process, a warm-up, then a fixed measured window, driven by the
same load generator, bench/load.py, in separate processes):

  echo       the framework's ceiling: a bare grpc.aio server echoing a VerifyCodeRequest
  verify     VerifyCode on `twofactor serve`, one process
  verify-traced  the same with OpenTelemetry tracing on, exporting to an OTLP receiver here
  signin     SignIn (password + code; argon2id makes it slow, by design)
  verify-hostile  VerifyCode while the web console is attacked (tests/hostile_console.py:
             compressed bombs, slow bodies, idle connections, garbage, a SignIn flood); its
             throughput is printed as a ratio to `verify` (issue 16)
  verify-2w  VerifyCode on `twofactor serve --workers 2`
  echo-2w    the echo server, 2 processes (what 2 processes can give at best on this machine)
  soak       (BENCH_SOAK=seconds) a long VerifyCode run, watching the server's memory
  profile    (BENCH_PROFILE=1) py-spy records the server under VerifyCode load

The service runs as `make run` runs it: the embedded PostgreSQL, here in .data/bench (the bench
owns that folder; .data/ is never touched), seeded with BENCH_ACCOUNTS enrolled accounts, with
metrics on (the VerifyCode batch sizes are read there). With BENCH_TARGET=host:port the same
VerifyCode load runs against a deployed service instead (bench/target.py says what it needs).
Exits non-zero when any call had an unexpected outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from otlp_sink import OtlpSink  # noqa: E402
from seed import BenchAccounts, reset_counters, seed  # noqa: E402
from target import Target, note_used_until, prepare_target  # noqa: E402

from twofactor_service.config import Config  # noqa: E402
from twofactor_service.encryption import load_key_ring  # noqa: E402
from twofactor_service.store import database  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SIGN_IN_WARMUP_SECONDS = 8.0
PHASES = ("echo", "verify", "verify-traced", "verify-hostile", "signin", "verify-2w", "echo-2w")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--duration",
        type=float,
        default=float(_env("BENCH_DURATION", "20")),
        help="measured seconds per phase (BENCH_DURATION)",
    )
    add(
        "--warmup",
        type=float,
        default=float(_env("BENCH_WARMUP", "2")),
        help="warm-up seconds per phase (BENCH_WARMUP)",
    )
    add(
        "--concurrency",
        type=int,
        default=int(_env("BENCH_CONCURRENCY", "64")),
        help="calls in flight (BENCH_CONCURRENCY)",
    )
    add(
        "--channels",
        type=int,
        default=int(_env("BENCH_CHANNELS", "16")),
        help="client TCP connections in all (BENCH_CHANNELS)",
    )
    add(
        "--clients",
        type=int,
        default=int(_env("BENCH_CLIENTS", "1")),
        help="load-generator processes (BENCH_CLIENTS)",
    )
    add(
        "--accounts",
        type=int,
        default=int(_env("BENCH_ACCOUNTS", "20000")),
        help="enrolled accounts to seed (BENCH_ACCOUNTS)",
    )
    add(
        "--wrong-share",
        type=float,
        default=float(_env("BENCH_WRONG_SHARE", "0.05")),
        help="share of VerifyCode calls with a wrong code (BENCH_WRONG_SHARE)",
    )
    add(
        "--phases",
        default=_env("BENCH_PHASES", ",".join(PHASES)),
        help=f"comma-separated, of {', '.join(PHASES)} (BENCH_PHASES)",
    )
    add(
        "--soak",
        type=float,
        default=float(_env("BENCH_SOAK", "0")),
        help="seconds of the memory-flatness run; 0 skips it (BENCH_SOAK)",
    )
    add(
        "--profile",
        choices=["", "0", "1", "native"],
        default=_env("BENCH_PROFILE", ""),
        help="record a py-spy profile of the server under VerifyCode load: 1 (Python frames) "
        "or native (BENCH_PROFILE)",
    )
    add("--data-dir", type=Path, default=ROOT / ".data" / "bench")
    return parser.parse_args()


# --- Processes: CPU time and memory from /proc.


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(p) for p in text]
    return found


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """Each live process's CPU seconds so far (user + system)."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return seconds


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_by_pid(pids).values())


def cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU seconds the processes alive now spent since `before` was read (those started since,
    all of theirs). A process that ended meanwhile (an autovacuum worker, say) is left out
    instead of having its earlier CPU subtracted; what it spent goes to "other"."""
    return sum(now - before.get(pid, 0.0) for pid, now in cpu_by_pid(pids).items())


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine spent (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def memory_kb(pid: int, field_name: str) -> int:
    """VmHWM (peak resident set) or VmRSS of a process, in KiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- Servers under test.


@dataclass
class Server:
    # None for a deployed service (BENCH_TARGET): nothing of it is watched here.
    process: subprocess.Popen[bytes] | None
    port: int
    log_path: Path
    supervisor: bool  # a parent that only supervises worker processes
    # Each serving process's Prometheus port (TwoFactorService only).
    metrics_ports: list[int] = field(default_factory=list)
    # Where the load goes: this machine's port, or BENCH_TARGET.
    address: str = ""
    # BENCH_TARGET_CA: the deployed service's CA certificate, for TLS.
    ca: str = ""

    def __post_init__(self) -> None:
        self.address = self.address or f"127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process else []

    @property
    def serving_pids(self) -> list[int]:
        """The processes that serve calls (not a supervising parent or its helpers)."""
        if self.process is None:
            return []
        if not self.supervisor:
            return [self.process.pid]
        return [p for p in _children(self.process.pid) if "resource_tracker" not in _cmdline(p)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_for(server: Server, marker: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.process is None or server.process.poll() is not None:
            break
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        if marker in text:
            return
        time.sleep(0.05)
    tail = server.log_path.read_text(errors="replace")[-2000:]
    raise SystemExit(f"server did not start (see {server.log_path}):\n{tail}")


@contextlib.contextmanager
def echo_server(data_dir: Path, workers: int) -> Iterator[Server]:
    port = free_port()
    log_path = data_dir / f"echo-{workers}.log"
    with log_path.open("wb") as log:
        command = [
            sys.executable,
            str(HERE / "echo_server.py"),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    server = Server(process, port, log_path, supervisor=workers > 1)
    try:
        _wait_for(server, "ready")
        if workers > 1:
            _wait_for_listeners(port, workers)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def service(
    data_dir: Path,
    workers: int,
    name: str,
    otlp_port: int | None = None,
    console_port: int | None = None,
) -> Iterator[Server]:
    """`twofactor serve` as `make run` starts it, on the bench's data folder; with tracing
    only when `otlp_port` names the receiver to export to, and the web console only when
    `console_port` is given."""
    port = free_port()
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWOFACTOR_", "OTEL_"))}
    if otlp_port is not None:
        # The SDK's defaults otherwise (every span sampled, batches of 512 every 5 s), unless
        # the bench is given OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
        )
        for knob in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
            if knob in os.environ:
                env[knob] = os.environ[knob]
    # Pass through only the tuning knobs; the database and the key are the bench's own.
    knobs = ("DATABASE_POOL_SIZE", "VERIFY_BATCHES_IN_FLIGHT", "PASSWORD_CHECKS")
    for knob in (f"TWOFACTOR_{k}" for k in knobs):
        if knob in os.environ:
            env[knob] = os.environ[knob]
    env.update(
        TWOFACTOR_DATA_DIR=str(data_dir),
        TWOFACTOR_LISTEN_ADDRESS=f"127.0.0.1:{port}",
        # The bench measures gRPC; the console stays off (and off 8080), but in verify-hostile.
        TWOFACTOR_CONSOLE_ADDRESS=f"127.0.0.1:{console_port}" if console_port else "",
        TWOFACTOR_WORKERS=str(workers),
        # As deployed: metrics on (worker i serves them on this port + i), and the bench reads
        # the VerifyCode batch sizes there.
        TWOFACTOR_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        # The service's default level: the access log writes a line per call, as deployed.
        TWOFACTOR_LOG_LEVEL=_env("BENCH_LOG_LEVEL", "INFO"),
    )
    log_path = data_dir / f"server-{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own entry point
            [str(ROOT / ".venv" / "bin" / "twofactor"), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    ports = [metrics_port + i for i in range(workers)]
    server = Server(process, port, log_path, supervisor=workers > 1, metrics_ports=ports)
    try:
        _wait_for(server, "listening on")
        yield server
    finally:
        server.stop()


def _wait_for_listeners(port: int, count: int) -> None:
    """SO_REUSEPORT: every worker has bound the port (each is one LISTEN socket)."""
    suffix = f":{port:04X}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listening = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    listening += local.endswith(suffix) and state == "0A"
        if listening >= count:
            return
        time.sleep(0.05)
    raise SystemExit(f"not all {count} workers listen on port {port}")


# --- Load.


@dataclass
class Result:
    name: str
    processes: int
    calls_per_second: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    errors: int = 0
    peak_rss_mb: list[float] = field(default_factory=list)
    supervisor_rss_mb: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    starved: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    worker_cpu: list[float] = field(default_factory=list)
    # VerifyCode batches settled in the measured window, by size bucket (upper bound, count).
    batches: list[tuple[float, float]] = field(default_factory=list)

    @property
    def rss_text(self) -> str:
        mb = self.peak_rss_mb
        if not mb:
            return "n/a"
        text = f"{mb[0]:.0f} MB" if len(mb) == 1 else " + ".join(f"{m:.0f}" for m in mb) + " MB"
        if self.supervisor_rss_mb:
            text += f" (+{self.supervisor_rss_mb:.0f} MB supervisor)"
        return text


def percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def postgres_pids(data_dir: Path) -> list[int]:
    pid_file = data_dir / "postgres" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        return process_tree(int(pid_file.read_text().split()[0]))
    return []


def run_load(
    args: argparse.Namespace,
    server: Server,
    kind: str,
    result: Result,
    *,
    duration: float | None = None,
    margin: float = 3.0,
    warmup: float | None = None,
    during: Any = None,
    after_step: int = -1,
) -> Result:
    duration = args.duration if duration is None else duration
    warmup = args.warmup if warmup is None else warmup
    start_at = time.time() + 2.0  # the clients import, connect, then start together
    clients = []
    for part in range(args.clients):
        share = args.concurrency // args.clients + (part < args.concurrency % args.clients)
        channels = max(1, args.channels // args.clients)
        command = [
            sys.executable,
            str(HERE / "load.py"),
            "--target",
            server.address,
            "--ca",
            server.ca,
            "--kind",
            kind,
            "--accounts",
            str(args.data_dir / "accounts.json"),
            "--concurrency",
            str(share),
            "--channels",
            str(channels),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
            "--start-at",
            str(start_at),
            "--wrong-share",
            str(args.wrong_share),
            "--margin",
            str(margin),
            "--part",
            str(part),
            "--parts",
            str(args.clients),
            "--seed",
            str(part),
            "--after-step",
            str(after_step),
        ]
        clients.append(subprocess.Popen(command, stdout=subprocess.PIPE))  # noqa: S603
    measure_from = start_at + warmup
    time.sleep(max(0.0, measure_from - time.time()))
    # Each party's processes, looked up again at the end: PostgreSQL starts and ends backends.
    watched: dict[str, Callable[[], list[int]]] = {"load": lambda: [c.pid for c in clients]}
    if server.process is not None:  # a deployed service's processes are not here to watch
        watched |= {"server": lambda: server.pids, "postgres": lambda: postgres_pids(args.data_dir)}
    before = {k: cpu_by_pid(pids()) for k, pids in watched.items()}
    batches_before = batch_histogram(server)
    workers = server.serving_pids if server.supervisor else []
    workers_before = [cpu_seconds([p]) for p in workers]
    machine_before = machine_busy_seconds()
    began = time.time()
    if during is not None:
        during(server, result, measure_from + duration)
    time.sleep(max(0.0, measure_from + duration - time.time()))
    elapsed = time.time() - began
    batches_after = batch_histogram(server)
    result.batches = [
        (bound, batches_after.get(bound, 0.0) - batches_before.get(bound, 0.0))
        for bound in sorted(batches_after)
    ]
    result.cpu = {k: cpu_since(before[k], pids()) / elapsed * 100 for k, pids in watched.items()}
    # How the kernel spread the connections (SO_REUSEPORT): each worker's share of the work.
    result.worker_cpu = [
        (cpu_seconds([p]) - b) / elapsed * 100 for p, b in zip(workers, workers_before, strict=True)
    ]
    # Whatever else ran on the machine meanwhile (it competes for the same cores).
    machine = (machine_busy_seconds() - machine_before) / elapsed * 100
    result.cpu["other"] = max(0.0, machine - sum(result.cpu.values()))
    pids = server.serving_pids
    result.peak_rss_mb = [memory_kb(p, "VmHWM") / 1024 for p in pids]
    if server.supervisor and server.process is not None:
        result.supervisor_rss_mb = memory_kb(server.process.pid, "VmHWM") / 1024
    latencies: list[float] = []
    for client in clients:
        out, _ = client.communicate()
        if client.returncode != 0:
            raise SystemExit(f"load generator failed with exit code {client.returncode}")
        data = json.loads(out)
        latencies += data["latencies_ms"]
        result.counts.update(data["counts"])
        result.unexpected.update(data["unexpected"])
        result.unexpected.update(data["unexpected_outside"])
        result.starved += data["starved"]
    latencies.sort()
    result.calls_per_second = len(latencies) / duration
    result.p50, result.p90, result.p99 = (percentile(latencies, q) for q in (0.5, 0.9, 0.99))
    result.errors = sum(result.unexpected.values())
    return result


def batch_histogram(server: Server) -> dict[float, float]:
    """Cumulative VerifyCode batch counts by size bound (`le`), summed over the processes."""
    totals: Counter[float] = Counter()
    for port in server.metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "twofactor_verify_batch_size_bucket":
                    totals[float(sample.labels["le"])] += sample.value
    return dict(totals)


def describe_batches(batches: list[tuple[float, float]]) -> str | None:
    """'batches: N, mean size M; size 1: a%, 2: b%, 3-4: c%, ...' (shares of calls)."""
    if not batches or not batches[-1][1]:
        return None
    rows, previous_bound, previous_count = [], 0.0, 0.0
    calls = 0.0
    for bound, cumulative in batches:
        count = cumulative - previous_count
        upper = bound if bound != float("inf") else previous_bound * 2
        middle = (previous_bound + 1 + upper) / 2
        calls += count * middle
        rows.append((previous_bound, bound, count, middle))
        previous_bound, previous_count = bound, cumulative
    total = batches[-1][1]
    shares = []
    for low, high, count, middle in rows:
        if not count:
            continue
        name = (
            f"{int(high)}"
            if high == low + 1
            else f"{int(low) + 1}-" + (f"{int(high)}" if high != float("inf") else "")
        )
        shares.append(f"{name}: {count * middle / calls * 100:.0f}%")
    return (
        f"   batches: {total:.0f}, mean size ~{calls / total:.1f}; calls by batch size: "
        + ", ".join(shares)
    )


def describe(result: Result) -> str:
    cpu = "  ".join(f"{k} {v:.0f}%" for k, v in result.cpu.items())
    if result.worker_cpu:
        cpu += "  (workers: " + " + ".join(f"{v:.0f}%" for v in result.worker_cpu) + ")"
    plural = "es" if result.processes > 1 else ""
    lines = [
        f"== {result.name} ({result.processes} server process{plural})",
        f"   calls/s {result.calls_per_second:8.0f}   p50 {result.p50:6.1f} ms   "
        f"p90 {result.p90:6.1f} ms   p99 {result.p99:6.1f} ms   errors {result.errors}   "
        f"peak RSS {result.rss_text}",
        f"   outcomes: {dict(sorted(result.counts.items()))}   cpu (of one core): {cpu}",
    ]
    if result.calls_per_second:
        # CPU time per call: steadier than calls/s when other work shares the machine.
        per_call = "  ".join(
            f"{k} {v / 100 / result.calls_per_second * 1e6:.0f} µs"
            for k, v in result.cpu.items()
            if k != "other" and v >= 0.5
        )
        lines.append(f"   cpu per call: {per_call}")
    batches = describe_batches(result.batches)
    if batches:
        lines.append(batches)
    if result.starved:
        lines.append(f"   waited {result.starved} times for a fresh code (raise BENCH_ACCOUNTS)")
    for problem, count in result.unexpected.most_common(5):
        lines.append(f"   UNEXPECTED x{count}: {problem}")
    return "\n".join(lines)


# --- Phases.


async def prepare(args: argparse.Namespace, url: str) -> BenchAccounts:
    config = Config(data_dir=args.data_dir)
    key_ring, _ = load_key_ring(config)  # the key the server will load from the same folder
    conn = await asyncpg.connect(url)
    try:
        accounts = await seed(conn, key_ring, users=args.accounts, lockout_users=16)
    finally:
        await conn.close()
    accounts.save(args.data_dir / "accounts.json")
    return accounts


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await reset_counters(conn)
    finally:
        await conn.close()


def soak_watch(server: Server, result: Result, until: float) -> None:
    """Samples the server's resident memory once a second through the measured window."""
    began = time.time()
    while time.time() < until:
        rss = sum(memory_kb(p, "VmRSS") for p in server.serving_pids) / 1024
        result.rss_samples.append((time.time() - began, rss))
        time.sleep(max(0.0, min(1.0, until - time.time())))


def profile(args: argparse.Namespace, server: Server, result: Result, until: float) -> None:
    """py-spy over the measured window, every thread. By default Python frames only, sampled
    without pausing the server: compiled code (grpc core, uvloop, asyncpg's protocol) then
    shows as time in Runner.run. BENCH_PROFILE=native adds native frames, but native unwinding
    pauses the server at each sample (this phase's figures drop) and counts time in syscalls."""
    out = args.data_dir / "profile-verify.txt"
    seconds = max(1, int(until - time.time()))
    pid = str(server.serving_pids[0])
    command = [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-p", pid, "-d", str(seconds)]
    command += ["-f", "raw", "-o", str(out), "--threads"]
    if args.profile == "native":
        command += ["-r", "100", "--native"]
    else:
        command += ["-r", "250", "--nonblocking"]
    subprocess.run(command, check=True, capture_output=True)  # noqa: S603 - our venv's py-spy


def _frame_name(frame: str) -> str:
    """`function (path/file.py:line)` → `function (file.py)`; an unnamed native frame
    `0x7f.. (grpc/_cython/cygrpc....so)` → `[native] (cygrpc....so)`."""
    function, _, where = frame.partition(" (")
    where = where.rstrip(")").split(":")[0].rsplit("/", 1)[-1]
    if function.startswith("0x"):
        function = "[native]"
    return f"{function} ({where})" if where else function


def summarize_profile(path: Path, top: int = 25) -> str:
    """Own and inclusive share of samples per function, from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            threads[frames.pop(0)] += count
        names = [_frame_name(f) for f in frames if f]
        if not names:
            continue
        for name in set(names):
            inclusive[name] += count
        own[names[-1]] += count
    lines = [f"py-spy: {total} samples; by thread: "]
    lines[0] += ", ".join(f"{t} {c / total * 100:.0f}%" for t, c in threads.most_common())
    lines.append(f"own time (top {top}):")
    lines += [f"  {c / total * 100:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines.append(f"inclusive time (top {top}):")
    lines += [f"  {c / total * 100:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines)


def run_against_target(args: argparse.Namespace, target: Target) -> int:
    """BENCH_TARGET: VerifyCode's load against a deployed service (bench/target.py); its
    processes are not on this machine, so only the latency, the throughput and the outcomes are
    reported, and no ratio (the bare echo server runs here, not there)."""
    count = int(_env("BENCH_TARGET_ACCOUNTS", "2000"))
    state_file = args.data_dir / f"target-{target.address.replace(':', '_')}.json"
    accounts = prepare_target(target, count, state_file)
    accounts.save(args.data_dir / "accounts.json")
    print(f"target {target.address}: {accounts.users} bench accounts ({state_file})", flush=True)
    remote = Server(None, 0, state_file, False, address=target.address, ca=target.ca)
    result = run_load(
        args,
        remote,
        "verify",
        Result(f"verify at {target.address}", 0),
        after_step=accounts.used_until_step,
    )
    # The codes of this run used steps up to the one after its end.
    note_used_until(state_file, int(time.time()) // 30 + 1)
    print(describe(result), flush=True)
    print(flush=True)
    print(summary_table({"target": result}), flush=True)
    print("ratio: n/a (BENCH_TARGET: the bare gRPC server runs only on this machine)")
    return 1 if result.errors else 0


def verify_hostile(args: argparse.Namespace) -> Result:
    """VerifyCode's load while another process attacks the console of the same server. The
    attacker runs in SCHED_IDLE, as in tests/test_console_isolation.py: it stands for clients on
    other machines, whose CPU is not the server's."""
    console_port = free_port()
    # BENCH_HOSTILE_KINDS=bomb,slow-body,idle,garbage,sign-in (all by default): which attacks.
    kinds = [os.environ["BENCH_HOSTILE_KINDS"]] if os.environ.get("BENCH_HOSTILE_KINDS") else []
    with service(args.data_dir, 1, "verify-hostile", console_port=console_port) as server:
        command = ["chrt", "--idle", "0", sys.executable, "-m", "tests.hostile_console"]
        attacker = subprocess.Popen(  # noqa: S603 - the suite's own attacker
            [*command, f"127.0.0.1:{console_port}", *kinds],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert attacker.stdout is not None
            if attacker.stdout.readline() != b"attacking\n":
                raise SystemExit("the console's attacker did not start")
            result = run_load(args, server, "verify", Result("verify-hostile", 1))
        finally:
            attacker.terminate()
            report, _ = attacker.communicate(timeout=60)
    answers = json.loads(report.decode().strip().splitlines()[-1])
    print(f"   the console's attacker was answered: {answers}", flush=True)
    return result


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    target = Target.from_environment()
    if target is not None:
        return run_against_target(args, target)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phase(s): {', '.join(sorted(unknown))}")
    print(
        f"bench: {os.cpu_count()} cores; {args.concurrency} calls in flight over "
        f"{args.channels} connections from {args.clients} load process(es); warm-up "
        f"{args.warmup:g} s, then {args.duration:g} s per phase",
        flush=True,
    )
    if args.soak > 0:
        # An account yields about 3 + T/30 codes over T seconds (the ±1 step window, then one
        # new step every 30 s); size the pool for up to 3000 calls/s over the whole soak.
        needed = int(3000 * (args.soak + args.warmup) / (3 + (args.soak + args.warmup) / 30))
        args.accounts = max(args.accounts, needed)
    # This process holds a handle on the embedded PostgreSQL for the whole run, so it stays up
    # between the server processes (pgserver stops it when the last handle is gone).
    url = database.start_embedded(args.data_dir)
    t0 = time.monotonic()
    asyncio.run(prepare(args, url))
    print(
        f"seeded {args.accounts} enrolled accounts in {time.monotonic() - t0:.1f} s "
        f"(embedded PostgreSQL in {args.data_dir})",
        flush=True,
    )

    results: dict[str, Result] = {}
    for phase in phases:
        asyncio.run(reset(url))
        sink: OtlpSink | None = None
        if phase.startswith("echo"):
            workers = 2 if phase == "echo-2w" else 1
            with echo_server(args.data_dir, workers) as server:
                result = run_load(args, server, "echo", Result(phase, workers))
        elif phase == "verify-hostile":
            result = verify_hostile(args)
        else:
            workers = 2 if phase == "verify-2w" else 1
            kind = "signin" if phase == "signin" else "verify"
            # A sign-in waits seconds behind argon2 (~0.15 s of CPU each, 64 in flight): keep
            # clear of step boundaries, and warm up until completions flow steadily.
            margin = 20.0 if kind == "signin" else 3.0
            warmup = max(args.warmup, SIGN_IN_WARMUP_SECONDS) if kind == "signin" else None
            with contextlib.ExitStack() as stack:
                if phase == "verify-traced":
                    sink = stack.enter_context(OtlpSink())
                server = stack.enter_context(
                    service(args.data_dir, workers, phase, sink.port if sink else None)
                )
                if workers > 1:
                    _wait_for_listeners(server.port, workers)
                result = run_load(
                    args, server, kind, Result(phase, workers), margin=margin, warmup=warmup
                )
                server.stop()  # the last spans are flushed at the stop
        results[phase] = result
        print(describe(result), flush=True)
        if sink is not None:
            print(sink.describe(), flush=True)

    if args.profile and args.profile != "0":
        asyncio.run(reset(url))
        with service(args.data_dir, 1, "profile") as server:
            result = run_load(
                args,
                server,
                "verify",
                Result("verify under py-spy", 1),
                during=lambda s, r, u: profile(args, s, r, u),
            )
        results["profile"] = result
        print(describe(result), flush=True)
        print(summarize_profile(args.data_dir / "profile-verify.txt"), flush=True)

    if args.soak > 0:
        asyncio.run(reset(url))
        with service(args.data_dir, 1, "soak") as server:
            result = run_load(
                args,
                server,
                "verify",
                Result(f"soak {args.soak:g} s", 1),
                duration=args.soak,
                during=soak_watch,
            )
        results["soak"] = result
        print(describe(result), flush=True)
        samples = result.rss_samples
        if samples:
            first, last = samples[0][1], samples[-1][1]
            peak = max(s[1] for s in samples)
            minutes = max(samples[-1][0] - samples[0][0], 1e-9) / 60
            print(
                f"   memory after warm-up {first:.1f} MB, at the end {last:.1f} MB, peak "
                f"{peak:.1f} MB: growth {last - first:+.1f} MB "
                f"({(last - first) / minutes:+.2f} MB/min)",
                flush=True,
            )
            mid = samples[len(samples) // 2][1]
            print(f"   second half growth {last - mid:+.1f} MB", flush=True)

    print(flush=True)
    print(summary_table(results), flush=True)
    if "echo" in results and "verify" in results and results["echo"].calls_per_second:
        ratio = results["verify"].calls_per_second / results["echo"].calls_per_second
        print(f"ratio: {ratio:.2f}")
    if "verify" in results and "verify-traced" in results and results["verify"].calls_per_second:
        traced = results["verify-traced"].calls_per_second / results["verify"].calls_per_second
        print(f"tracing on / off (VerifyCode): {traced:.2f}x")
    if "verify" in results and "verify-hostile" in results and results["verify"].calls_per_second:
        hostile = results["verify-hostile"].calls_per_second / results["verify"].calls_per_second
        print(f"verify-hostile / verify (VerifyCode, console attacked): {hostile:.2f}")
    if "verify" in results and "verify-2w" in results and results["verify"].calls_per_second:
        scale = results["verify-2w"].calls_per_second / results["verify"].calls_per_second
        print(f"2 workers / 1 worker (VerifyCode): {scale:.2f}x")
    if "echo" in results and "echo-2w" in results and results["echo"].calls_per_second:
        scale = results["echo-2w"].calls_per_second / results["echo"].calls_per_second
        print(f"2 processes / 1 process (echo): {scale:.2f}x")
    errors = sum(r.errors for r in results.values())
    print(f"bench took {time.monotonic() - began:.0f} s; unexpected outcomes: {errors}")
    return 1 if errors else 0


def summary_table(results: dict[str, Result]) -> str:
    rows = [
        "| phase | server processes | calls/s | p50 ms | p90 ms | p99 ms | errors | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        rows.append(
            f"| {r.name} | {r.processes} | {r.calls_per_second:.0f} | {r.p50:.1f} | "
            f"{r.p90:.1f} | {r.p99:.1f} | {r.errors} | {r.rss_text} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
