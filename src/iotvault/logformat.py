"""How iotvault's log lines look: plain text (the default) or JSON lines, never forgeable.

A log line often carries something a client chose: a topic, a client id, a device id, a name
typed into a form. A carriage return or line feed in it would start what looks like a new line
of the log (a forged "login succeeded"), and other control characters can rewrite a terminal.
Both formatters escape them (``\\x0a``) in the message; JSON lines (``IOTVAULT_LOG_FORMAT=json``,
for a log shipper) escape them by the encoding itself, one object per line:
``{"time", "level", "logger", "message"}`` and ``"exception"`` when there is one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from iotvault.domain.audit import printable

__all__ = ["JsonFormatter", "TextFormatter", "formatter"]


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with control characters in the message escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback is a field of it, not lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True)


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter()
