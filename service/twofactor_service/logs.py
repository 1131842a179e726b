"""Structured logs: one JSON object per line on stderr, written in batches (a tenth of a
second at most after they were logged; warnings and errors at once).

The access log, a line per call, skips the logging machinery's records and formatter: it
writes lines of the same shape, built directly (transport/access_log.py), to the handlers that
take lines (`write_line`). A record and its formatting cost a VerifyCode about 60 µs of the
server's CPU under load, a sixth of the call (docs/performance.md).

Only what a call site puts in `extra` (names, reasons, ids) and the message are written; no
handler ever logs a request, so secrets, codes, passwords and tokens never reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

_second: tuple[int, str] = (0, "")


def timestamp(seconds: float) -> str:
    """UTC, to the millisecond: 2026-12-01T09:44:26.321+00:00 (the date part made once a
    second)."""
    global _second
    whole = int(seconds)
    cached = _second  # read once: another thread may replace it meanwhile
    if cached[0] != whole:
        cached = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((seconds - whole) * 1000):03d}+00:00"


def write_line(line: str) -> None:
    """A line already formatted as JsonFormatter formats a record, to the root logger's handlers
    that take lines (configure()'s does; a handler without `write_line` gets none). The caller
    checked its logger's level."""
    for handler in logging.getLogger().handlers:
        write = getattr(handler, "write_line", None)
        if write is not None:
            write(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type and where it was raised; exception messages can quote input, so no text.
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatStack(self._frames(record))
        return json.dumps(entry, default=str)

    @staticmethod
    def _frames(record: logging.LogRecord) -> str:
        import traceback

        tb = record.exc_info[2] if record.exc_info else None
        return "".join(traceback.format_tb(tb))


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: at most `FLUSH_SECONDS` after they were logged, when `capacity`
    are waiting, at once for a warning or worse, and at exit. One write per line, with the
    event loop's thread letting go of the GIL and taking it back for each, was a fifth of a
    VerifyCode's CPU at INFO (docs/performance.md)."""

    FLUSH_SECONDS = 0.1

    def __init__(self, stream: TextIO, capacity: int = 512) -> None:
        super().__init__(stream)
        self.capacity = capacity
        # Appended to without the lock (the access log's lines) and taken from under it: a
        # deque's append and popleft are atomic, so no line is lost between the two.
        self.waiting: deque[str] = deque()
        flusher = threading.Thread(target=self._flush_now_and_then, name="log-flush", daemon=True)
        flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - as logging.Handler does: report, never raise
            self.handleError(record)
            return
        self.write_line(line)
        if record.levelno >= logging.WARNING:
            self.flush()

    def write_line(self, line: str) -> None:
        self.waiting.append(line)
        if len(self.waiting) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.waiting:
                lines = [self.waiting.popleft() for _ in range(len(self.waiting))]
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def _flush_now_and_then(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            if self.waiting:
                self.flush()


def configure(level: str) -> None:
    # A record need not say which thread or process wrote it: skip looking them up.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pgserver logs every command line it runs at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
