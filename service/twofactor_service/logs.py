"""Structured logs: one JSON object per line on stderr.

Only what a call site puts in `extra` (names, reasons, ids) and the message are written; no
handler ever logs a request, so secrets, codes, passwords and tokens never reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pgserver logs every command line it runs at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
