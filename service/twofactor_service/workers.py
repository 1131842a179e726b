"""`twofactor serve --workers N`: N server processes sharing one listening port.

One Python process serves gRPC on about one core (the GIL). With N workers, each process binds
the same address with SO_REUSEPORT (server.py sets `grpc.so_reuseport` when workers > 1) and
the kernel spreads incoming connections over them. Each worker is a whole server with its own
event loop, connection pool and health service, so health is reported truthfully per process;
all state is in PostgreSQL, so workers are replicas like any others (SPEC §3) and the replay
and lockout rules hold across them as across machines.

The parent does the once-only work before starting them (the embedded PostgreSQL, the
development encryption key, the migrations), then supervises: SIGTERM or SIGINT is passed on
and each worker stops gracefully; if a worker dies on its own, the parent stops the others and
exits non-zero, so the process supervisor restarts the whole service.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from types import FrameType

from twofactor_service.config import Config
from twofactor_service.transport.metrics import worker_address

log = logging.getLogger(__name__)

# A worker's entry point: (config, database URL, pipe to send "ready" on). Module-level, so
# the spawn start method can pickle it by name.
WorkerMain = Callable[[Config, str, Connection], None]

# Beyond the workers' own graceful-stop grace (cli.py stops the server with grace=10).
STOP_TIMEOUT_SECONDS = 15.0
START_TIMEOUT_SECONDS = 60.0


def run_workers(
    config: Config, url: str, worker_main: WorkerMain, announce: Callable[[], None]
) -> bool:
    """Runs `config.workers` processes until a signal stops them (True) or one of them fails
    (False). `announce` is called once every worker is serving."""
    # spawn, not fork: a forked child would inherit the parent's gRPC and asyncpg state.
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    waiting: dict[Connection, int] = {}
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in range(1, config.workers + 1):
            reader, writer = context.Pipe(duplex=False)
            started = context.Process(
                target=worker_main,
                args=(_worker_config(config, number), url, writer),
                name=f"twofactor-worker-{number}",
            )
            started.start()
            writer.close()
            processes.append(started)
            waiting[reader] = number
        # Until every worker has said "ready", a worker exiting is a failed start.
        sentinels = {process.sentinel: process for process in processes}
        while waiting and not stopping:
            ready = wait([*waiting, *sentinels], timeout=START_TIMEOUT_SECONDS)
            if stopping:
                break
            if not ready:
                log.error("workers did not start in time")
                return _stop(processes, stop_all)
            for item in ready:
                if isinstance(item, int):
                    log.error("worker exited during start", extra={"worker": sentinels[item].name})
                    return _stop(processes, stop_all)
                assert isinstance(item, Connection)
                with contextlib.suppress(EOFError):
                    item.recv()
                item.close()
                del waiting[item]
        if not stopping:
            announce()
        while not stopping:
            exited = [item for item in wait(list(sentinels), timeout=1.0) if isinstance(item, int)]
            if exited and not stopping:
                dead = sentinels[exited[0]]
                dead.join()
                log.error(
                    "worker exited; stopping the others",
                    extra={"worker": dead.name, "exit_code": dead.exitcode},
                )
                return _stop(processes, stop_all)
        for process in processes:
            process.join(STOP_TIMEOUT_SECONDS)
        # A worker still starting when the SIGTERM came had no handler for it yet; ended by
        # that signal, it stopped as asked (it was serving nothing).
        unclean = [p for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
        for process in unclean:
            log.error(
                "worker did not stop cleanly",
                extra={"worker": process.name, "exit_code": process.exitcode},
            )
        _kill_leftovers(processes)
        return not unclean
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_config(config: Config, number: int) -> Config:
    """Each worker has its own counters, so its own metrics endpoint: base port + (number - 1)."""
    if not config.metrics_address:
        return config
    return dataclasses.replace(
        config, metrics_address=worker_address(config.metrics_address, number - 1)
    )


def _stop(
    processes: list[multiprocessing.process.BaseProcess], stop_all: Callable[[], None]
) -> bool:
    stop_all()
    for process in processes:
        process.join(STOP_TIMEOUT_SECONDS)
    _kill_leftovers(processes)
    return False


def _kill_leftovers(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            log.warning("worker did not stop in time; killing it", extra={"worker": process.name})
            process.kill()
            process.join()
