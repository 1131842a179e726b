"""Structured logs: one JSON object per line on stderr, written in batches (a tenth of a
second at most after they were logged; warnings and errors at once).

Only what a call site puts in `extra` (names, reasons, ids) and the message are written; no
handler ever logs a request, so secrets, codes, passwords and tokens never reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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
        self.waiting: list[str] = []
        flusher = threading.Thread(target=self._flush_now_and_then, name="log-flush", daemon=True)
        flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - as logging.Handler does: report, never raise
            self.handleError(record)
            return
        self.waiting.append(line)
        if len(self.waiting) >= self.capacity or record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.waiting:
                lines, self.waiting = self.waiting, []
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
