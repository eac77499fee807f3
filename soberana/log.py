"""The `soberana` logger's default handler (vLLM-style: on unless told otherwise)."""

from __future__ import annotations

import logging
import os
import sys


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
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s",
                                           "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("SOBERANA_LOGGING_LEVEL", "INFO"))
