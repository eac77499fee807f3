"""The `soberana` logger's default handler (vLLM-style: on unless told otherwise), as text or
one JSON object per line.

A record may carry structured fields (`extra={"fields": {...}}`): the text format appends them
as `key=value`, the JSON format puts them at the top level, so log pipelines can index them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from soberana.config_flags import flag

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LoggingConfig:
    """The logging flags of the long-running commands (`soberana serve`, `gateway`)."""

    log_level: str = flag("info", "least severe log level printed", choices=LOG_LEVELS,
                          type=str.lower)  # fmt: skip
    log_format: str = flag(
        "text", "text, or json: one JSON object per line (request lines carry their fields as "
        "keys)", choices=LOG_FORMATS)

    def configure(self) -> None:
        """Install the process's root handler (see `configure`)."""
        configure(self.log_format, self.log_level)


class TextFormatter(logging.Formatter):
    """`LEVEL time logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    converter = staticmethod(time.gmtime)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `--log-format`; raises ValueError naming the allowed values."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(log_format: str, level: str) -> None:
    """Root handler for a server process (`soberana serve`, `gateway`), and the same format for
    child processes it starts (the engine core reads SOBERANA_LOG_FORMAT in setup_logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    os.environ["SOBERANA_LOG_FORMAT"] = log_format


def setup_logging() -> None:
    """Log INFO and above of `soberana.*` to stderr, unless SOBERANA_CONFIGURE_LOGGING=0 or
    the application configured logging itself (a handler on the root or `soberana` logger).

    Records still propagate, so tools that listen at the root (pytest's caplog) see them.
    """
    if os.environ.get("SOBERANA_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("soberana")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(os.environ.get("SOBERANA_LOG_FORMAT", "text")))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("SOBERANA_LOGGING_LEVEL", "INFO"))


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if (" " in text or "=" in text or '"' in text or not text) else text
