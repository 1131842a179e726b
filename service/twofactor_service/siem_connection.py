"""A connection to the SIEM's syslog receiver: TCP, or TLS on it (RFC 5425) with the
receiver's CA and an optional client certificate; every step bounded in time.

Syslog over TCP has no acknowledgement of its own, so `send` waits for the strongest one TCP
gives: the bytes are handed to the kernel (asyncio's drain) and then acknowledged by the
receiver's TCP stack (the socket's unacknowledged-bytes count, Linux SIOCOUTQ, falls to zero).
That still does not prove the receiver *read* them (they may sit in its socket buffer when it
stops), which the exporter covers by confirming an event only once the connection has stayed
up for a while after its acknowledgement (siem_export.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import ssl
import struct
import termios
import time
from dataclasses import dataclass

from twofactor_service.config import SiemConfig

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
HANDSHAKE_TIMEOUT_SECONDS = 5.0
# A write and its acknowledgement by the receiver's TCP, at most.
WRITE_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 2.0


class ReceiverUnavailable(Exception):
    """The receiver cannot be reached or stopped taking messages; `stage` says where."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


def tls_context(settings: SiemConfig) -> ssl.SSLContext:
    """Verifies the receiver against its CA (the system's trust store when none is given) and
    its name; presents the client certificate when one is configured."""
    ca = str(settings.ca_file) if settings.ca_file else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.client_cert_file and settings.client_key_file:
        context.load_cert_chain(settings.client_cert_file, settings.client_key_file)
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc.__class__.__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _unacknowledged_bytes(sock: socket.socket | None) -> int:
    """Bytes the receiver's TCP has not acknowledged yet (Linux SIOCOUTQ); 0 where the kernel
    does not say, so the acknowledgement is then only the hand-over to the kernel."""
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, AttributeError, ValueError):  # not a socket the kernel reports on
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


@dataclass
class HandshakeInfo:
    version: str
    cipher: str
    # The receiver certificate's subject, as the TLS library prints it.
    peer: str


class ReceiverConnection:
    """One connection to the receiver; broken for good once any step fails."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.tls: HandshakeInfo | None = None
        self.connected_at = time.monotonic()
        # Set when the receiver closes its side or the connection fails: a syslog receiver
        # never sends anything, so any end of the read side means it is gone.
        self.lost = asyncio.Event()
        # The receiver ended the stream cleanly (EOF), rather than failing or resetting it.
        self.closed_by_receiver = False
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: SiemConfig) -> ReceiverConnection:
        """TCP connect, then the TLS handshake when configured; ReceiverUnavailable names the
        stage that failed."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection(settings.host, settings.port)
        except (OSError, TimeoutError) as exc:
            raise ReceiverUnavailable(
                f"connect to {settings.host}:{settings.port}", _describe(exc)
            ) from None
        connection = cls(reader, writer)
        if settings.transport == "tls":
            try:
                context = tls_context(settings)
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
                    await writer.start_tls(
                        context,
                        server_hostname=settings.host,
                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS,
                    )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                connection.abort()
                raise ReceiverUnavailable("TLS handshake", _describe(exc)) from None
            cipher = writer.get_extra_info("cipher") or ("?", "?", 0)
            certificate = writer.get_extra_info("peercert") or {}
            subject = ", ".join(
                f"{key}={value}" for rdn in certificate.get("subject", ()) for key, value in rdn
            )
            connection.tls = HandshakeInfo(cipher[1], cipher[0], subject)
        connection._watcher = asyncio.create_task(connection._watch())
        return connection

    async def _watch(self) -> None:
        try:
            while await self._reader.read(4096):
                pass  # a receiver has nothing to say; whatever it says is ignored
            self.closed_by_receiver = True
        except Exception:  # noqa: BLE001, S110 - any failure of the read side means "lost"
            pass
        finally:
            self.lost.set()

    async def send(self, data: bytes) -> None:
        """Writes `data` and returns once the receiver's TCP acknowledged all of it; raises
        ReceiverUnavailable when the connection is lost or that takes longer than
        WRITE_TIMEOUT_SECONDS (a stalled receiver)."""
        if self.lost.is_set():
            raise ReceiverUnavailable("send", "the receiver closed the connection")
        sock = self._writer.get_extra_info("socket")
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                self._writer.write(data)
                await self._writer.drain()
                delay = 0.001
                while (
                    self._writer.transport.get_write_buffer_size() > 0
                    or _unacknowledged_bytes(sock) > 0
                ):
                    if self.lost.is_set():
                        raise ConnectionResetError("the receiver closed the connection")
                    # Polling a kernel counter: TCP has no event for "acknowledged".
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.abort()
            raise ReceiverUnavailable("send", _describe(exc)) from None
        if self.lost.is_set():
            raise ReceiverUnavailable("send", "the receiver closed the connection")

    async def hand_over(self, within: float) -> bool:
        """Ends a plain TCP stream so that the receiver proves it read everything sent: our FIN
        comes after the last byte, so the receiver sees the end of the stream only once it read
        them all, and closes its side in turn. True when that close arrives within `within`
        seconds; always False over TLS (asyncio cannot half-close a TLS stream)."""
        if self.lost.is_set() or not self._writer.can_write_eof():
            return False
        try:
            self._writer.write_eof()
            async with asyncio.timeout(within):
                await self.lost.wait()
        except (OSError, TimeoutError):
            return False
        return self.closed_by_receiver

    def abort(self) -> None:
        self.lost.set()
        if self._watcher is not None:
            self._watcher.cancel()
        self._writer.transport.abort()

    async def close(self) -> None:
        """Closes politely (TLS close_notify), within CLOSE_TIMEOUT_SECONDS."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            self._writer.transport.abort()
        self.lost.set()
