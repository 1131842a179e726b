"""The access log: one line per call, with the method, the final status code, the duration,
the request id and the peer. Never the request or the response, which hold passwords, codes,
secrets, tokens and tickets."""

from __future__ import annotations

import logging

import grpc

from twofactor_service.transport.call_context import call_info
from twofactor_service.transport.completion import ObservingInterceptor, Report
from twofactor_service.transport.interceptors import Context, Handler

log = logging.getLogger("twofactor_service.access")

# Probes call these every few seconds; at INFO they would drown the calls that matter.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _request_id_sent(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            return text[:64]
    return ""


class AccessLogInterceptor(ObservingInterceptor):
    """Outside the ErrorInterceptor, so it logs the status the client gets and the request id
    that interceptor settled on (the caller's x-request-id, or a new one)."""

    def reporter(self, handler: Handler, method: str) -> Report:
        level = logging.DEBUG if method.startswith(_QUIET_PREFIXES) else logging.INFO

        def report(context: Context, code: grpc.StatusCode, seconds: float) -> None:
            if not log.isEnabledFor(level):
                return
            info = call_info.get(None)
            if info is not None and info.method == method:
                request_id, peer = info.request_id, info.peer
            else:  # not one of TwoFactorService's methods: no request id was settled on
                request_id, peer = _request_id_sent(context), context.peer() or ""
            log.log(
                level,
                "rpc",
                extra={
                    "method": method,
                    "code": code.name,
                    "duration_ms": round(seconds * 1000, 3),
                    "request_id": request_id,
                    "peer": peer,
                },
            )

        return report
