"""Logging setup: human-readable text, or one JSON object per line for log pipelines.

With `--log-format json` every line on stderr is a JSON object with `time`, `level`, `logger` and
`message`, plus every field a caller passed through `extra=` (the access log's `method`, `tenant`,
`code`, `latency_ms`, `run_id`). Log shippers then need no parsing rules, and a field never gets
lost in a message's wording. Secrets stay out because nothing here logs metadata or bodies: the
fields are only what the code explicitly passes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON: the standard keys plus the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra value must cost its precision, never the log line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the time's seconds formatted once per second: `time.strftime` for every line
    was a tenth of an access-log line's cost, and a busy server writes thousands of lines a second."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # as logging.Formatter writes it


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the formatter `log_format` names: json (any case), or
    text (the settings check it is one of them: evalsvc.config.CHOICES)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format.lower() == "json" else TextFormatter())
    return handler


def configure(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Route every logger to one handler on stderr, in the chosen format and level.

    Neither format shows the thread, the process or the calling line, so records do not collect
    them (the logging HOWTO's "Optimization"): on the access log's hot path that was ~15% of a line."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no findCaller(): the formats print no source line
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format, stream)], force=True)
    # httpx logs every request at INFO with its whole URL: a line per model call, and the credentials a
    # URL may carry (`https://user:password@...`), in clear. evalsvc says what matters of its outbound
    # calls itself (failures, retries; metrics count the rest); httpx still speaks at WARNING, and at
    # `--log-level debug` says everything, as before.
    root = logging.getLogger().level
    quiet = max(logging.WARNING, root) if root > logging.DEBUG else logging.NOTSET
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(quiet)
