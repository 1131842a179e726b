"""Telling a busy listening address apart, by name, before gRPC tries it.

When gRPC's core cannot bind, it writes a raw log line of its own to stderr and the Python
side gets a bare RuntimeError. `ensure_can_listen` binds the address first the way gRPC will
(SO_REUSEADDR, and SO_REUSEPORT when workers share the port), releases it at once, and raises
`AddressUnavailable`, which names the address and the variable that sets it.
"""

from __future__ import annotations

import contextlib
import socket


class AddressUnavailable(Exception):
    """A listening address cannot be bound (most often: another process listens there)."""

    def __init__(self, address: str, variable: str, reason: str) -> None:
        self.address, self.variable, self.reason = address, variable, reason
        super().__init__(
            f"cannot listen on {address}: {reason}. Another program (perhaps another "
            f"`twofactor serve`) may be listening there; set {variable} to a free host:port, "
            f"for example {variable}={_next_port(address)}"
        )


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def _next_port(address: str) -> str:
    parts = _split(address)
    if parts is None or not 0 < parts[1] < 65535:
        return "127.0.0.1:50052"
    host, port = parts
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + 1}"


def ensure_can_listen(address: str, variable: str, *, reuse_port: bool = False) -> None:
    """Raises AddressUnavailable when no address `address` resolves to can be bound. Like
    gRPC, one bindable address is enough. An address that does not parse or resolve is left
    for gRPC to judge."""
    parts = _split(address)
    if parts is None:
        return
    host, port = parts
    try:
        resolved = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                with contextlib.suppress(AttributeError, OSError):
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                failures.append(exc)
                continue
        return
    reason = failures[0].strerror if failures and failures[0].strerror else "cannot bind"
    raise AddressUnavailable(address, variable, reason.lower())
