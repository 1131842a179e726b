"""The peer a call is recorded with, when the web console forwarded it for a browser.

The console (console/bridge.py, in the console's own process) passes each browser call to this
server over a unix socket, so the server sees the peer "unix:", not the browser. The bridge
names the browser's address in metadata, together with a key made when this process started
that goes nowhere but to its own console process, on that process's stdin (never on a command
line): only the bridge can send it, so no other caller (over TCP, or over another unix socket)
can have an address of its choosing written to the audit log.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import grpc

from twofactor_service.caller import CONSOLE_PEER_PREFIX

# Metadata the bridge adds to each forwarded call; a browser's own headers of these names are
# never forwarded.
FORWARDED_FOR = "x-twofactor-forwarded-for"
FORWARDED_KEY = "x-twofactor-forwarded-key"
# Made once per server process (each worker of `serve --workers N` has its own, and hands it to
# its own console process).
BRIDGE_KEY = secrets.token_urlsafe(32)
# A browser's address as the bridge writes it, e.g. "ipv4:127.0.0.1:51234"; more is cut.
MAX_FORWARDED_LENGTH = 100


def call_peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """gRPC's peer of the call, or "console:<browser address>" for a call the bridge forwarded."""
    peer = context.peer() or ""
    if not peer.startswith("unix:"):
        return peer
    forwarded = key = None
    for name, value in context.invocation_metadata() or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name == FORWARDED_FOR:
            forwarded = text
        elif name == FORWARDED_KEY:
            key = text
    if forwarded is None or key is None or not hmac.compare_digest(key, BRIDGE_KEY):
        return peer
    printable = "".join(ch if ch.isprintable() else "?" for ch in forwarded)
    return CONSOLE_PEER_PREFIX + printable[:MAX_FORWARDED_LENGTH]
