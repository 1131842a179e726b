"""The console's HTTP front door: what an anonymous client on the network meets first.

aiohttp parses HTTP; this module bounds what a client can make it do (docs/security.md,
"The console's isolation"):

- **No inflating.** Request bodies are never decompressed (`auto_decompress=False`): a request
  with any `Content-Encoding` but `identity` is answered 415 and its body is never read. The
  browser client never compresses requests.
- **Every read has a deadline.** A request's head must arrive within the header timeout from
  its first byte, its body within the body timeout (bridge.py), and a connection with no
  request in it is closed after the idle timeout. TLS handshakes get the header timeout too.
- **A cap on connections.** Past `max_connections` open connections a new one is answered 503
  and closed at once.
- **Only our own names.** A request whose `Host` is not one of the console's names is refused
  (421), so a page on a DNS-rebound name cannot reach the API from a victim's browser.
- **Every answer carries the security headers**, the framework's own refusals of malformed
  HTTP included, and none says which server software it is (no `Server` header).
- **Refusals are logged as warnings, not errors**: one line each, without a traceback, and at
  most a burst of `RefusalLog.BURST` then one a second (the rest are counted in the next line),
  so nobody can flood the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from twofactor_service.config import ConsoleLimits

log = logging.getLogger("twofactor_service.console")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # The QR code of a pending key is shown from a blob: URL of its PNG bytes.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Answers hold session-bound data; the bundle changes with each release.
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# After an answer, how long an unread request body is read and dropped before the connection
# closes (so that the client reads the answer rather than a reset).
LINGER_SECONDS = 1.0


class RefusalLog:
    """WARNING lines for refused requests: a burst of BURST, then at most one a second; the
    lines left out are counted in the next one written."""

    BURST = 10
    PER_SECOND = 1.0

    def __init__(self) -> None:
        self.tokens = float(self.BURST)
        self.last = time.monotonic()
        self.suppressed = 0

    def refused(self, event: str, peer: object, status: int | None = None) -> None:
        now = time.monotonic()
        self.tokens = min(self.BURST, self.tokens + (now - self.last) * self.PER_SECOND)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        extra: dict[str, Any] = {"event": event, "peer": _peer_text(peer)}
        if status is not None:
            extra["status"] = status
        if self.suppressed:
            extra["suppressed"] = self.suppressed
            self.suppressed = 0
        log.warning("console request refused", extra=extra)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unknown"


class Refusal(web.Response):
    """An answer of the front door itself: plain text, the security headers, no `Server`
    header, and the connection closed after it (its body, if any, is never read)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(status=status, text=text + "\n", headers=SECURITY_HEADERS)
        self.force_close()

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        # aiohttp adds "Server: Python/3.x aiohttp/3.x" by default.
        self.headers.popall(hdrs.SERVER, None)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the headers of docs/console.md on every answer of the app."""
    cache = response.headers.get(hdrs.CACHE_CONTROL)
    response.headers.update(SECURITY_HEADERS)
    if cache is not None:  # a handler's own choice stands
        response.headers[hdrs.CACHE_CONTROL] = cache
    if request.secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    response.headers.popall(hdrs.SERVER, None)


def allowed_hosts(bound_host: str, configured: Iterable[str]) -> frozenset[str]:
    """TWOFACTOR_CONSOLE_HOSTS when set; else the bound address (unless it is a wildcard) and
    the loopback names."""
    names = set(configured)
    if not names:
        names.update(LOOPBACK_NAMES)
        host = _normalized(bound_host)
        if host and not _is_wildcard(host):
            names.add(host)
    return frozenset(names)


def _normalized(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return host


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header ("[::1]:8080" -> "::1", "Example.org:80" ->
    "example.org")."""
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header
    else:
        name, _, port = header.rpartition(":")
        if not name or not port.isdigit():
            name = header
    return _normalized(name)


def host_check(hosts: frozenset[str], refusals: RefusalLog) -> Any:
    @web.middleware
    async def _allowed_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST, "")
        if host_name(header) not in hosts:
            refusals.refused("unknown host name", request.remote, 421)
            return Refusal(
                421,
                "this console does not answer for that host name "
                "(the names it answers to are set by TWOFACTOR_CONSOLE_HOSTS)",
            )
        return await handler(request)

    return _allowed_host


def identity_only(refusals: RefusalLog) -> Any:
    @web.middleware
    async def _identity_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        encoding = request.headers.get(hdrs.CONTENT_ENCODING)
        if encoding is not None and encoding.strip().lower() != "identity":
            # Refused before a byte of the body is read: nothing is inflated, ever.
            refusals.refused("compressed request body", request.remote, 415)
            return Refusal(415, "compressed request bodies are not accepted; send them as is")
        coding = request.headers.get(hdrs.TRANSFER_ENCODING)
        if coding is not None and coding.strip().lower() != "chunked":
            # A compressed transfer coding ("gzip, chunked"): RFC 9112 §6.1 says 501.
            refusals.refused("compressed request body", request.remote, 501)
            return Refusal(501, "transfer codings other than chunked are not accepted")
        return await handler(request)

    return _identity_only


class FrontDoor(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the header timeout, the connection cap, and refusals of
    malformed requests that carry the security headers and log one warning line."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        limits: ConsoleLimits,
        refusals: RefusalLog,
    ) -> None:
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.idle_timeout_seconds,
            lingering_time=LINGER_SECONDS,
            auto_decompress=False,
            # No access log of aiohttp's own (AppRunner passes None too); refusals are logged
            # here, calls by the gRPC server's access log.
            access_log=None,  # type: ignore[arg-type]
        )
        self.limits = limits
        self.refusals = refusals
        self.head_timer: asyncio.TimerHandle | None = None
        # Between requests: the next byte begins a head, timed from then.
        self.awaiting_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if manager is not None and len(manager.connections) >= self.limits.max_connections:
            # Turned away: connection_lost has nothing to undo.
            self._manager = None
            # Nothing it sends is parsed.
            self._force_close = True
            peer = transport.get_extra_info("peername")
            self.refusals.refused("too many connections", peer, 503)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_BUSY)
            # Closed only after a moment: closing with its request unread would reset the
            # connection, and the client might lose the answer.
            if transport.can_write_eof():
                transport.write_eof()
            self._loop.call_later(LINGER_SECONDS, transport.close)
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.awaiting_head and self.head_timer is None and data:
            self.head_timer = self._loop.call_later(
                self.limits.header_timeout_seconds, self._head_too_slow
            )
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a whole head (or a malformed one) came in
            self.awaiting_head = False
            self._cancel_head_timer()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        self.awaiting_head = not self._messages
        return finished

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self) -> None:
        self.head_timer = None
        if self.awaiting_head and self.transport is not None:
            self.refusals.refused("request head too slow", self.peername)
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400 and the like), or to a fault of
        ours (500). Only a fault of ours is an error with a traceback."""
        if status >= 500:
            log.error("console request failed", exc_info=exc)
        else:
            self.refusals.refused("malformed HTTP request", request.remote, status)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already sent on this connection")
        if status == HTTPStatus.BAD_REQUEST:
            return Refusal(status, "400 Bad Request: not an HTTP/1.1 request this console takes")
        try:
            return Refusal(status, f"{status} {HTTPStatus(status).phrase}")
        except ValueError:
            return Refusal(status, str(status))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A request body that breaks HTTP's framing mid-way surfaces here (while aiohttp drops
        an unread body): the client's fault, so a refusal, not an error."""
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            self.refusals.refused("malformed HTTP request body", self.peername, 400)
            return
        super().log_exception(*args, **kw)


_BUSY_TEXT = b"too many connections; try again later\n"
_BUSY = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())
    + "Content-Type: text/plain; charset=utf-8\r\n"
    + f"Content-Length: {len(_BUSY_TEXT)}\r\n"
    + "Connection: close\r\n\r\n"
).encode("ascii") + _BUSY_TEXT


class FrontDoorSite(web.BaseSite):
    """A TCP listener whose connections are served by FrontDoor."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ConsoleLimits,
        refusals: RefusalLog,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.port = host, port
        self.limits, self.refusals = limits, refusals
        self.reuse_port = reuse_port
        self.listener: asyncio.Server

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        limits, refusals = self.limits, self.refusals
        self.listener = await loop.create_server(
            lambda: FrontDoor(server, loop=loop, limits=limits, refusals=refusals),
            self.host,
            self.port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self.reuse_port or None,
            ssl_handshake_timeout=limits.header_timeout_seconds if self._ssl_context else None,
        )
        self._server = self.listener

    @property
    def bound_port(self) -> int:
        port: int = self.listener.sockets[0].getsockname()[1]
        return port
