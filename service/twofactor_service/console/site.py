"""The console's HTTP server (aiohttp): the page, its bundle, and the RPC bridge. It runs in the
console's own process (process.py), never on the gRPC server's event loop.

Every response carries headers that keep the page to itself (front_door.py): a
Content-Security-Policy that allows only this origin's own script, style and calls (no inline
script or style, no framing), X-Frame-Options DENY, no referrer, no sniffing. There are no CORS
headers, and the bridge refuses calls a browser marks as coming from another site, so no other
origin can drive it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from twofactor_service.config import ConsoleLimits
from twofactor_service.console.bridge import Bridge
from twofactor_service.console.front_door import (
    FrontDoorSite,
    RefusalLog,
    allowed_hosts,
    host_check,
    identity_only,
    security_headers,
)
from twofactor_service.policy import SERVICE

STATIC = Path(str(resources.files("twofactor_service.console") / "static"))

# How long a stop waits for running calls (a followed audit log never ends by itself).
SHUTDOWN_SECONDS = 2.0


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


def application(
    channel: grpc.aio.Channel,
    max_message_bytes: int,
    forwarded_key: str,
    limits: ConsoleLimits,
    hosts: frozenset[str],
    refusals: RefusalLog,
) -> web.Application:
    bridge = Bridge(channel, SERVICE, forwarded_key, limits.body_timeout_seconds)
    # A request is one message frame (5 bytes) plus the message; more is refused (413).
    app = web.Application(
        middlewares=[host_check(hosts, refusals), identity_only(refusals), _same_origin_only],
        client_max_size=max_message_bytes + 5,
    )
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC)
    app.router.add_post(f"/{SERVICE.full_name}/{{method}}", bridge.handle)
    return app


def ssl_context(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None
) -> ssl.SSLContext | None:
    """The gRPC port's certificate settings (TWOFACTOR_TLS_*), client certificates included."""
    if cert_file is None or key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca_file)
    return context


@dataclass
class ConsoleSite:
    """The console's HTTP server, running in this (the console's) process."""

    runner: web.AppRunner
    channel: grpc.aio.Channel
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.channel.close()


async def serve_console(
    *,
    host: str,
    port: int,
    socket_path: str,
    max_message_bytes: int,
    forwarded_key: str,
    limits: ConsoleLimits,
    context: ssl.SSLContext | None,
    reuse_port: bool,
) -> ConsoleSite:
    """Serves the console on host:port, forwarding to the gRPC server's unix socket."""
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    refusals = RefusalLog()
    app = application(
        channel,
        max_message_bytes,
        forwarded_key,
        limits,
        allowed_hosts(host, limits.hosts),
        refusals,
    )
    # handler_cancellation: a browser that leaves a followed audit log ends its call.
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS, access_log=None
    )
    await runner.setup()
    site = FrontDoorSite(
        runner,
        host,
        port,
        limits=limits,
        refusals=refusals,
        ssl_context=context,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await channel.close()
        raise
    return ConsoleSite(runner, channel, site.bound_port)
