"""The console's own process: `python -m twofactor_service.console.process`, started and watched
by the gRPC server's process (supervisor.py), one per server process.

Everything of the console's HTTP side happens here, never on the gRPC server's event loop:
parsing, TLS, static files, reading bodies, and a crash. The process:

- reads its settings as one JSON line on stdin (the forwarded-peer key among them: stdin, not
  the command line, which any local user can read in /proc), and nothing of the service's
  configuration beyond them: no database URL, no encryption keys;
- lowers its own CPU priority (SCHED_IDLE by default, lower_priority), so that under CPU
  pressure the gRPC server's event loop, VerifyCode's path, wins;
- says "ready <port>" on stdout once it listens (or "failed <message>" and exits 2);
- ends with its parent: stdin reaching EOF means the parent is gone (however it died), and
  PR_SET_PDEATHSIG asks the kernel for a SIGTERM then as well;
- stops on SIGTERM (gracefully, within site.SHUTDOWN_SECONDS) and ignores SIGINT, which a
  terminal sends to the whole process group: the parent decides when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from twofactor_service.config import ConsoleLimits

log = logging.getLogger("twofactor_service.console")

EXIT_OK, EXIT_FAILED_START = 0, 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ConsoleSettings:
    host: str
    port: int
    socket_path: str
    max_message_bytes: int
    forwarded_key: str
    limits: ConsoleLimits
    reuse_port: bool
    log_level: str
    parent_pid: int
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None

    def to_line(self) -> bytes:
        fields = dataclasses.asdict(self)
        return json.dumps(fields).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ConsoleSettings:
        fields: dict[str, Any] = json.loads(line)
        limits = dict(fields.pop("limits"))
        limits["hosts"] = tuple(limits["hosts"])
        return cls(limits=ConsoleLimits(**limits), **fields)


def lower_priority(cpu_class: str) -> None:
    """Below the gRPC server. "idle": SCHED_IDLE, the class of the argon2 threads
    (passwords.py): the console runs only on CPU time no ordinary task wants, and a task that
    wakes takes the CPU from it at once, so its parsing never delays a VerifyCode. "batch":
    SCHED_BATCH at nice 10 (about a tenth of an ordinary task's share, never preempting one on
    waking), for a host whose CPU is never idle, where SCHED_IDLE would starve the console.
    Both are allowed without privileges; where SCHED_IDLE is not available, nice 19."""
    try:
        if cpu_class == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        os.nice(10)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, 19)


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM when the parent exits (Linux); the stdin watch covers everything else."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def _parent_gone(stdin: asyncio.StreamReader) -> None:
    while await stdin.read(4096):
        pass


async def run(settings: ConsoleSettings) -> int:
    from twofactor_service.console.site import serve_console, ssl_context

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        context = ssl_context(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        site = await serve_console(
            host=settings.host,
            port=settings.port,
            socket_path=settings.socket_path,
            max_message_bytes=settings.max_message_bytes,
            forwarded_key=settings.forwarded_key,
            limits=settings.limits,
            context=context,
            reuse_port=settings.reuse_port,
        )
    except OSError as exc:
        reason = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or "unusable")
        _say(f"failed {reason}")
        return EXIT_FAILED_START
    _say(f"ready {site.port}")
    watch = asyncio.create_task(_parent_gone(stdin))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((watch, stopped), return_when=asyncio.FIRST_COMPLETED)
    if watch.done():
        log.warning("console process: the server process is gone; stopping")
    for task in (watch, stopped):
        task.cancel()
    await site.stop()
    return EXIT_OK


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = ConsoleSettings.from_line(sys.stdin.buffer.readline())
    die_with_parent(settings.parent_pid)
    lower_priority(settings.limits.cpu_class)
    from twofactor_service import logs

    logs.configure(settings.log_level)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
