"""The access log: one line per call, with the method, the final status code, the reason of a
refusal (its ErrorInfo reason), the duration, the request id and the peer. Never the request or
the response, which hold passwords, codes, secrets, tokens and tickets.

The line is built here, in the shape of logs.JsonFormatter's, and written with logs.write_line:
no LogRecord, no formatter (a sixth of a VerifyCode's CPU, docs/performance.md). The values a
client chose (the request id, a forwarded peer) are JSON-escaped like any other.
"""

from __future__ import annotations

import logging
import time
from json.encoder import encode_basestring_ascii as json_string  # json.dumps, for one str

import grpc

from twofactor_service import logs
from twofactor_service.transport.call_context import call_info
from twofactor_service.transport.pipeline import Context, Report

log = logging.getLogger("twofactor_service.access")

# Probes call these every few seconds; at INFO they would drown the calls that matter.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _request_id_sent(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            return text[:64]
    return ""


def reporter(method: str, kind: str) -> Report:
    """The access log line of one method's calls, written as each call ends with the status the
    client gets and the request id the pipeline settled on (the caller's x-request-id, or a new
    one)."""
    level = logging.DEBUG if method.startswith(_QUIET_PREFIXES) else logging.INFO
    # Everything up to the status code is the same for every call of the method.
    fixed = (
        f'"level": "{logging.getLevelName(level)}", "logger": "{log.name}", "message": "rpc", '
        f'"method": {json_string(method)}, "code": "'
    )

    def report(context: Context, code: grpc.StatusCode, seconds: float, reason: str) -> None:
        if not log.isEnabledFor(level):
            return
        info = call_info.get(None)
        if info is not None and info.method == method:
            request_id, peer = info.request_id, info.peer
        else:  # not one of TwoFactorService's methods: no request id was settled on
            request_id, peer = _request_id_sent(context), context.peer() or ""
        logs.write_line(
            f'{{"time": "{logs.timestamp(time.time())}", {fixed}{code.name}", '
            f'"reason": "{reason}", "duration_ms": {round(seconds * 1000, 3)}, '
            f'"request_id": {json_string(request_id)}, "peer": {json_string(peer)}}}'
        )

    return report
