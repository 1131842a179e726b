"""The console's HTTP server (aiohttp): the page, its bundle, and the RPC bridge.

Every response carries headers that keep the page to itself: a Content-Security-Policy that
allows only this origin's own script, style and calls (no inline script or style, no framing),
X-Frame-Options DENY, no referrer, no sniffing. There are no CORS headers, and the bridge
refuses calls a browser marks as coming from another site, so no other origin can drive it.
"""

from __future__ import annotations

import errno
import shutil
import ssl
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from twofactor_service.config import Config, ConfigError
from twofactor_service.console.bridge import Bridge
from twofactor_service.policy import SERVICE

STATIC = Path(str(resources.files("twofactor_service.console") / "static"))

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
}
# How long a stop waits for running calls (a followed audit log never ends by itself).
SHUTDOWN_SECONDS = 2.0


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if request.secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    # Answers hold session-bound data; the bundle changes with each release.
    response.headers.setdefault("Cache-Control", "no-store")


def cross_site(request: web.Request) -> bool:
    """A browser's request from a page of another origin. Fetch metadata says so directly; a
    browser that sends none still sends Origin on a cross-origin POST. Clients that are not
    browsers send neither, and are not at risk of being driven by someone else's page."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    return origin is not None and origin != f"{request.scheme}://{request.host}"


@web.middleware
async def _same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "POST" and cross_site(request):
        raise web.HTTPForbidden(text="cross-origin requests are refused")
    return await handler(request)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def application(channel: grpc.aio.Channel, max_message_bytes: int) -> web.Application:
    bridge = Bridge(channel, SERVICE)
    # A request is one message frame (5 bytes) plus the message; more is refused (413).
    app = web.Application(middlewares=[_same_origin_only], client_max_size=max_message_bytes + 5)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC)
    app.router.add_post(f"/{SERVICE.full_name}/{{method}}", bridge.handle)
    return app


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    """The gRPC port's certificate settings (TWOFACTOR_TLS_*), client certificates included."""
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    if config.tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=config.tls.client_ca_file)
    return context


@dataclass
class ConsoleEndpoint:
    """The running console: its HTTP server, its channel to the gRPC server, its socket."""

    runner: web.AppRunner
    channel: grpc.aio.Channel
    socket_dir: Path
    port: int
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.channel.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def start_console(config: Config, socket_dir: Path) -> ConsoleEndpoint:
    """Serves the console on `config.console_address`, forwarding to the gRPC server's unix
    socket in `socket_dir`."""
    assert config.console_address is not None
    host, _, port_text = config.console_address.rpartition(":")
    host = host.strip("[]")
    channel = grpc.aio.insecure_channel(f"unix:{socket_dir / 'grpc.sock'}")
    # handler_cancellation: a browser that leaves a followed audit log ends its call.
    runner = web.AppRunner(
        application(channel, config.max_message_bytes),
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_SECONDS,
        access_log=None,
    )
    await runner.setup()
    context = _ssl_context(config)
    # With `serve --workers N` every worker serves the console on the shared port too.
    site = web.TCPSite(
        runner, host, int(port_text), ssl_context=context, reuse_port=config.workers > 1
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await channel.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"TWOFACTOR_CONSOLE_ADDRESS: {config.console_address} is in use; choose "
                "another address, or set it empty to turn the console off"
            ) from None
        raise
    port = int(runner.addresses[0][1])
    scheme = "https" if context else "http"
    shown = f"[{host}]" if ":" in host else host
    return ConsoleEndpoint(runner, channel, socket_dir, port, f"{scheme}://{shown}:{port}/")
