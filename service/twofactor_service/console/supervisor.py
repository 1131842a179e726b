"""Starts the console's process (process.py) and keeps it running, from the gRPC server's
process: one console process per server process (with `serve --workers N`, one per worker,
each forwarding to its own worker's unix socket).

- **Start.** The child gets its settings on stdin and says "ready <port>" on stdout. A port
  that is taken is a configuration error naming TWOFACTOR_CONSOLE_ADDRESS, as before.
- **Restart.** If the child dies (a crash, an OOM kill, a signal), it is started again on the
  same port after a delay that doubles from RESTART_FIRST_DELAY to RESTART_MAX_DELAY, and
  starts over once a child has stayed up RESTART_RESET_AFTER. The gRPC side never waits for it.
- **Stop.** SIGTERM, then SIGKILL after STOP_TIMEOUT.
- **No orphan.** The child's stdin is a pipe from this process; when this process ends, however
  it ends, the pipe closes and the child stops itself (process.py).

Only waiting on a pipe and a child's exit happens here, on the gRPC server's loop: the child's
HTTP traffic never comes near it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from twofactor_service import background
from twofactor_service.config import Config, ConfigError
from twofactor_service.console.process import ConsoleSettings
from twofactor_service.transport.forwarded_peer import BRIDGE_KEY

log = logging.getLogger("twofactor_service.console")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
RESTART_FIRST_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
RESTART_RESET_AFTER = 60.0


class ConsoleStartFailed(RuntimeError):
    pass


@dataclass
class ConsoleEndpoint:
    """The console's process, as the gRPC server's process sees it."""

    settings: ConsoleSettings
    socket_dir: Path
    port: int
    url: str
    process: asyncio.subprocess.Process
    restarts: int = 0
    watcher: asyncio.Task[None] | None = field(default=None)
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        self.stopping = True
        if self.watcher is not None:
            await background.end(self.watcher)
        await _end(self.process)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    async def _watch(self) -> None:
        """Restarts the child whenever it dies, until stop()."""
        delay = RESTART_FIRST_DELAY
        while not self.stopping:
            started = time.monotonic()
            code = await self.process.wait()
            if self.stopping:
                return
            if time.monotonic() - started >= RESTART_RESET_AFTER:
                delay = RESTART_FIRST_DELAY
            log.error(
                "console process exited; starting it again",
                extra={"exit_code": code, "delay_seconds": delay},
            )
            while not self.stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY)
                try:
                    self.process, _ = await _spawn(self.settings)
                except (ConsoleStartFailed, OSError) as exc:
                    log.error("console process did not start", extra={"error": str(exc)})
                    continue
                self.restarts += 1
                log.info("console process started again", extra={"pid": self.process.pid})
                break


async def _spawn(settings: ConsoleSettings) -> tuple[asyncio.subprocess.Process, int]:
    """Starts a console process and waits until it listens; returns it and its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twofactor_service.console.process",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        # It needs none of the service's settings (encryption keys, database URL) beyond
        # its own, which come on stdin.
        env={k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")},
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(settings.to_line())
        await process.stdin.drain()
        async with asyncio.timeout(START_TIMEOUT):
            line = (await process.stdout.readline()).decode("utf-8", "replace").strip()
    except BaseException:
        await _end(process)
        raise
    word, _, rest = line.partition(" ")
    if word == "ready" and rest.isdigit():
        return process, int(rest)
    await _end(process)
    raise ConsoleStartFailed(rest or f"exited with status {process.returncode}")


async def _end(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if process.stdin is not None:
        process.stdin.close()


def settings_for(config: Config, socket_dir: Path) -> ConsoleSettings:
    assert config.console_address is not None
    host, _, port_text = config.console_address.rpartition(":")
    tls = config.tls
    return ConsoleSettings(
        host=host.strip("[]"),
        port=int(port_text),
        socket_path=str(socket_dir / "grpc.sock"),
        max_message_bytes=config.max_message_bytes,
        forwarded_key=BRIDGE_KEY,
        limits=config.console_limits,
        # With `serve --workers N` every worker's console serves the shared port.
        reuse_port=config.workers > 1,
        log_level=config.log_level,
        parent_pid=os.getpid(),
        tls_cert_file=str(tls.cert_file) if tls else None,
        tls_key_file=str(tls.key_file) if tls else None,
        tls_client_ca_file=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
    )


async def start_console(config: Config, socket_dir: Path) -> ConsoleEndpoint:
    """Starts the console's process on `config.console_address`, forwarding to the gRPC
    server's unix socket in `socket_dir`, and keeps it running until stop()."""
    settings = settings_for(config, socket_dir)
    try:
        process, port = await _spawn(settings)
    except ConsoleStartFailed as exc:
        if str(exc) == "in use":
            raise ConfigError(
                f"TWOFACTOR_CONSOLE_ADDRESS: {config.console_address} is in use; choose "
                "another address, or set it empty to turn the console off"
            ) from None
        raise
    # Restarts reuse the port the first one got (port 0 picks one once).
    settings = ConsoleSettings(**{**settings.__dict__, "port": port})
    scheme = "https" if config.tls else "http"
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    endpoint = ConsoleEndpoint(settings, socket_dir, port, f"{scheme}://{shown}:{port}/", process)
    endpoint.watcher = asyncio.create_task(endpoint._watch())
    return endpoint
